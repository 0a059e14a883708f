"""Model sizing from real configs, safetensors headers, the HF cache layout and --params."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.model_files import cached_snapshot, read_safetensors_header
from vllm_fleet.launcher.model_size import (
    estimate_params,
    kv_shape,
    normalize_dtype,
    parse_params,
    size_from_config,
    size_model,
)

MODELS = Path(__file__).parent / "models"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HOME": "/nonexistent"}


def config(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MODELS / name / "config.json").read_text())
    return data


@pytest.mark.parametrize(
    ("name", "params", "weight_bytes", "kv_bytes_per_token", "heads", "kv_heads", "context"),
    [
        # published checkpoint sizes (index metadata.total_size) and params of the model cards.
        # KV per token = 2 * layers * kv_heads * head_dim * 2 bytes (bf16):
        ("Llama-3.1-8B", 8.03e9, 16_060_522_496, 2 * 32 * 8 * 128 * 2, 32, 8, 131072),
        ("Llama-3.1-70B", 70.6e9, 141_107_412_992, 2 * 80 * 8 * 128 * 2, 64, 8, 131072),
        ("Llama-3.1-405B", 405.9e9, 811_706_777_600, 2 * 126 * 8 * 128 * 2, 128, 8, 131072),
        # head_dim 128 from config, not hidden/heads = 5120/32 = 160.
        ("Mistral-Nemo-Base-2407", 12.2e9, 24_495_564_800, 2 * 40 * 8 * 128 * 2, 32, 8, 128000),
        # MoE: all 8 experts count for memory (46.7B), not the 12.9B active.
        ("Mixtral-8x7B-v0.1", 46.7e9, 93_405_585_408, 2 * 32 * 8 * 128 * 2, 32, 8, 32768),
    ],
)
def test_real_models(
    name: str,
    params: float,
    weight_bytes: int,
    kv_bytes_per_token: int,
    heads: int,
    kv_heads: int,
    context: int,
) -> None:
    size = size_model(str(MODELS / name), env=OFFLINE, fetch=None)

    assert size.weight_bytes == weight_bytes
    assert size.num_params == pytest.approx(params, rel=0.01)
    assert size.kv_bytes_per_token == kv_bytes_per_token
    assert (size.num_attention_heads, size.num_key_value_heads) == (heads, kv_heads)
    assert size.max_model_len == context
    assert size.dtype == "bfloat16"
    assert size.name == name


def test_llama_8b_kv_per_token_is_128_kib() -> None:
    assert size_model(str(MODELS / "Llama-3.1-8B"), fetch=None).kv_bytes_per_token == 131072


@pytest.mark.parametrize(
    ("name", "exact"),
    [
        # the shape-based estimate reproduces the checkpoints' parameter counts exactly
        # (total_size / 2 bytes), so a config.json alone sizes these families right.
        ("Llama-3.1-8B", 8_030_261_248),
        ("Llama-3.1-70B", 70_553_706_496),
        ("Llama-3.1-405B", 405_853_388_800),
        ("Mistral-Nemo-Base-2407", 12_247_782_400),
        ("Mixtral-8x7B-v0.1", 46_702_792_704),
    ],
)
def test_estimate_from_shapes(name: str, exact: int) -> None:
    assert estimate_params(config(name)) == exact


def test_config_without_checkpoint_is_estimated(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config("Llama-3.1-8B")))

    size = size_model(str(tmp_path), fetch=None)

    assert size.weight_bytes == 16_060_522_496
    assert "estimated" in size.source


def test_dtype_override_recasts_the_checkpoint() -> None:
    fp32 = size_model(str(MODELS / "Llama-3.1-8B"), dtype="fp32", fetch=None)

    assert fp32.dtype == "float32"
    assert fp32.weight_bytes == 8_030_261_248 * 4
    assert fp32.kv_bytes_per_token == 2 * 32 * 8 * 128 * 4


def test_params_flag_overrides_the_checkpoint_size() -> None:
    size = size_model(str(MODELS / "Llama-3.1-70B"), params="72B", dtype="bf16", fetch=None)

    assert size.weight_bytes == 144_000_000_000
    assert size.kv_bytes_per_token == 327680


def test_quantized_config_shrinks_weights() -> None:
    awq = dict(config("Llama-3.1-70B"), quantization_config={"bits": 4, "quant_method": "awq"})
    fp8 = dict(config("Llama-3.1-70B"), quantization_config={"quant_method": "fp8"})

    four = size_from_config("awq", awq)
    eight = size_from_config("fp8", fp8)
    # the real checkpoint's own size wins when known (packed weights + scales).
    on_disk = size_from_config("awq", awq, checkpoint_bytes=39_770_000_000)

    assert four.weight_bytes == 70_553_706_496 // 2
    assert eight.weight_bytes == 70_553_706_496
    assert on_disk.weight_bytes == 39_770_000_000
    assert four.kv_bytes_per_token == 327680  # KV stays in the 16-bit compute dtype
    assert any("4-bit" in n for n in four.notes)


def test_multimodal_text_config_is_used() -> None:
    outer = {
        "architectures": ["LlavaForConditionalGeneration"],
        "torch_dtype": "float16",
        "text_config": config("Llama-3.1-8B"),
        "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24},
    }

    size = size_from_config("llava", outer)

    assert size.kv_bytes_per_token == 131072
    assert size.num_attention_heads == 32


def test_mla_caches_one_latent_per_layer() -> None:
    deepseek = {
        "hidden_size": 7168,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "torch_dtype": "bfloat16",
    }

    elements, heads, kv_heads = kv_shape(deepseek)

    assert elements == 61 * (512 + 64)
    assert (heads, kv_heads) == (128, 1)


def test_fp32_checkpoint_is_served_in_16_bits() -> None:
    size = size_from_config(
        "old", dict(config("Llama-3.1-8B"), torch_dtype="float32"), checkpoint_bytes=32_121_044_992
    )

    assert size.dtype == "bfloat16"
    assert size.weight_bytes == 16_060_522_496


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    sizes = {"BF16": 2, "F32": 4, "I8": 1}
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_safetensors_headers_count_params_and_bytes(tmp_path: Path) -> None:
    cfg = dict(config("Llama-3.1-8B"), num_hidden_layers=1, hidden_size=64, vocab_size=100)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _write_safetensors(
        tmp_path / "model-00001-of-00002.safetensors",
        {"embed": ("BF16", [100, 64]), "norm": ("F32", [64])},
    )
    _write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"q": ("I8", [64, 32])})

    size = size_model(str(tmp_path), fetch=None)

    assert size.num_params == 100 * 64 + 64 + 64 * 32
    assert size.weight_bytes == 100 * 64 * 2 + 64 * 4 + 64 * 32
    assert "2 safetensors header(s)" in size.source
    assert read_safetensors_header(tmp_path / "model-00002-of-00002.safetensors")["q"]["shape"] == [
        64,
        32,
    ]


def test_broken_safetensors_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config("Llama-3.1-8B")))
    (tmp_path / "model.safetensors").write_bytes(b"\x05")

    with pytest.raises(ConfigError, match="not a safetensors file"):
        size_model(str(tmp_path), fetch=None)


def test_hf_cache_snapshot_is_found(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--meta-llama--Llama-3.1-70B"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors.index.json"):
        (snapshot / name).write_text((MODELS / "Llama-3.1-70B" / name).read_text())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    env = {"HF_HOME": str(tmp_path)}

    size = size_model("meta-llama/Llama-3.1-70B", env=env, fetch=None)

    assert cached_snapshot("meta-llama/Llama-3.1-70B", env) == snapshot
    assert size.weight_bytes == 141_107_412_992
    assert size.name == "Llama-3.1-70B"


def test_fetcher_is_asked_when_nothing_is_local(tmp_path: Path) -> None:
    asked: list[str] = []

    def fetch(model: str, env: Any) -> Path:
        asked.append(model)
        return MODELS / "Mixtral-8x7B-v0.1"

    size = size_model("mistralai/Mixtral-8x7B-v0.1", env={"HF_HOME": str(tmp_path)}, fetch=fetch)

    assert asked == ["mistralai/Mixtral-8x7B-v0.1"]
    assert size.weight_bytes == 93_405_585_408


def test_params_alone_borrow_a_reference_shape(tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path)}

    size = size_model("org/unknown-70b", params="70B", dtype="bf16", env=env, fetch=None)

    assert size.weight_bytes == 140_000_000_000
    assert size.kv_bytes_per_token == 327680  # Llama-3.1-70B's shape
    assert size.num_attention_heads == 64
    assert any("Llama-3.1-70B" in n for n in size.notes)


def test_unsizable_model_names_the_flags(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        size_model("org/nothing-here", env={"HF_HOME": str(tmp_path)}, fetch=None)

    message = str(caught.value)
    assert "\n" not in message
    assert "--params 70B --dtype bf16" in message
    assert "org/nothing-here" in message


def test_directory_without_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.json"):
        size_model(str(tmp_path), fetch=None)


def test_config_missing_shape_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4096}))

    with pytest.raises(ConfigError, match="num_hidden_layers"):
        size_model(str(tmp_path), fetch=None)


@pytest.mark.parametrize(
    ("text", "count"),
    [("70B", 70_000_000_000), ("8b", 8_000_000_000), ("1.5B", 1_500_000_000),
     ("500M", 500_000_000), ("7e9", 7_000_000_000), ("405 B", 405_000_000_000)],
)  # fmt: skip
def test_parse_params(text: str, count: int) -> None:
    assert parse_params(text) == count


@pytest.mark.parametrize("text", ["seventy", "-3B", "0", "70X", ""])
def test_parse_params_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--params"):
        parse_params(text)


@pytest.mark.parametrize(
    ("text", "dtype"),
    [("bf16", "bfloat16"), ("BF16", "bfloat16"), ("half", "float16"), ("fp32", "float32"),
     ("auto", "auto"), ("torch.float16", "float16")],
)  # fmt: skip
def test_normalize_dtype(text: str, dtype: str) -> None:
    assert normalize_dtype(text) == dtype


def test_normalize_dtype_rejects() -> None:
    with pytest.raises(ConfigError, match="--dtype 'int3'"):
        normalize_dtype("int3")

"""How much memory a model needs: weights, and KV cache per token of context.

Read from what is on disk (``vllm_fleet.launcher.model_files`` finds and reads it), without
importing torch or transformers: ``config.json`` for the shape, ``model.safetensors.index.json``
(``metadata.total_size``) or the safetensors headers for the exact checkpoint size. When
nothing local exists, ``--params 70B`` stands in for the checkpoint and a known architecture
of that size stands in for the shape.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.model_files import (
    SIZE_HINT,
    Fetcher,
    fetch_from_hub,
    find_model_dir,
    hub_cache_dir,
    read_checkpoint,
    read_config_json,
)
from vllm_fleet.launcher.plan_types import ModelSize

#: bytes per element of the dtypes a checkpoint or a server may use.
DTYPE_BYTES: dict[str, float] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8": 1,
    "int8": 1,
    "int4": 0.5,
}
#: spellings of --dtype and config.json torch_dtype; the values are vLLM's --dtype names.
DTYPE_ALIASES = {
    "auto": "auto",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "float16": "float16",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "float32": "float32",
}


@dataclass(frozen=True)
class ReferenceShape:
    """A published architecture whose KV cache shape stands in when only --params is known."""

    name: str
    num_params: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int


#: Llama 3.x: the shapes most open checkpoints of each size class follow (GQA with 8 KV heads).
REFERENCE_SHAPES = (
    ReferenceShape("Llama-3.2-1B", 1_235_814_400, 16, 32, 8, 64, 131072),
    ReferenceShape("Llama-3.2-3B", 3_212_749_824, 28, 24, 8, 128, 131072),
    ReferenceShape("Llama-3.1-8B", 8_030_261_248, 32, 32, 8, 128, 131072),
    ReferenceShape("Llama-3.1-70B", 70_553_706_496, 80, 64, 8, 128, 131072),
    ReferenceShape("Llama-3.1-405B", 405_853_388_800, 126, 128, 8, 128, 131072),
)


# --------------------------------------------------------------------------- small parsers


def normalize_dtype(text: str, where: str = "--dtype") -> str:
    key = text.strip().lower().removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        raise ConfigError(
            f"{where} {text!r} is not a dtype; use auto, bfloat16 (bf16), float16 (fp16) "
            "or float32 (fp32)"
        )
    return DTYPE_ALIASES[key]


def parse_params(text: str) -> int:
    """``70B``, ``8b``, ``1.5B``, ``500M``, ``7e9`` -> a parameter count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([KMBT]?)\s*", text, re.IGNORECASE)
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"--params {text!r} is not a parameter count; write e.g. 70B or 7.5B")
    return int(float(match.group(1)) * scale[match.group(2).upper()])


def human_params(count: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


# --------------------------------------------------------------------------- sizing


def _first(config: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        value = config.get(key)
        if value is not None:
            return value
    return default


def _required(config: Mapping[str, Any], *keys: str) -> int:
    value = _first(config, *keys)
    if value is None:
        raise ConfigError(f"config.json has no {keys[0]}; {SIZE_HINT}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config.json {keys[0]}={value!r} is not a number; {SIZE_HINT}") from None


def text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Multimodal configs nest the language model under ``text_config``; its keys win."""
    nested = config.get("text_config") or config.get("llm_config")
    if isinstance(nested, Mapping):
        return {**config, **nested}
    return dict(config)


def config_dtype(config: Mapping[str, Any]) -> str | None:
    raw = _first(config, "torch_dtype", "dtype")
    if raw is None:
        return None
    try:
        return normalize_dtype(str(raw), "config.json torch_dtype")
    except ConfigError:
        return None


def quantized_bits(config: Mapping[str, Any]) -> float | None:
    """Bits per weight of a quantized checkpoint (GPTQ/AWQ ``bits``, fp8, bitsandbytes)."""
    quant = config.get("quantization_config")
    if not isinstance(quant, Mapping):
        return None
    if quant.get("bits"):
        return float(quant["bits"])
    method = str(quant.get("quant_method", "")).lower()
    if "fp8" in method or quant.get("fmt") in ("e4m3", "e5m2"):
        return 8.0
    if quant.get("load_in_4bit"):
        return 4.0
    if quant.get("load_in_8bit"):
        return 8.0
    weights = quant.get("weights")
    if isinstance(weights, Mapping) and weights.get("num_bits"):
        return float(weights["num_bits"])
    groups = quant.get("config_groups")
    if isinstance(groups, Mapping):
        for group in groups.values():
            if isinstance(group, Mapping) and isinstance(group.get("weights"), Mapping):
                bits = group["weights"].get("num_bits")
                if bits:
                    return float(bits)
    return None


def num_experts(config: Mapping[str, Any]) -> int:
    return int(_first(config, "num_local_experts", "num_experts", "n_routed_experts", default=1))


def estimate_params(config: Mapping[str, Any]) -> int:
    """Parameters of a decoder-only transformer from its shape (Llama/Mistral/Mixtral/Qwen
    layout: gated MLP, untied unless said); MoE counts every expert, since all stay loaded."""
    hidden = _required(config, "hidden_size", "n_embd", "d_model")
    layers = _required(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _required(config, "num_attention_heads", "n_head", "num_heads")
    kv_heads = int(_first(config, "num_key_value_heads", "num_kv_heads", default=heads))
    head_dim = int(_first(config, "head_dim", default=hidden // heads))
    vocab = int(_first(config, "vocab_size", default=32000))
    inter = int(_first(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden))
    experts = num_experts(config)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    if experts > 1:
        expert_inter = int(_first(config, "moe_intermediate_size", default=inter))
        shared = int(_first(config, "shared_expert_intermediate_size", default=0))
        shared += int(_first(config, "n_shared_experts", default=0)) * expert_inter
        mlp = experts * 3 * hidden * expert_inter + hidden * experts + 3 * hidden * shared
    else:
        mlp = 3 * hidden * inter
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
    return embeddings + layers * (attention + mlp + 2 * hidden) + hidden


def kv_shape(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(KV elements per token over all layers, attention heads, KV heads for TP splitting)."""
    layers = _required(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _required(config, "num_attention_heads", "n_head", "num_heads")
    if config.get("kv_lora_rank"):
        # MLA (DeepSeek-V2/V3): one compressed latent + the RoPE key per token and layer,
        # the same on every TP rank (reported as one KV head so it is never split).
        latent = int(config["kv_lora_rank"]) + int(config.get("qk_rope_head_dim", 64))
        return layers * latent, heads, 1
    hidden = _required(config, "hidden_size", "n_embd", "d_model")
    kv_heads = int(
        _first(config, "num_key_value_heads", "num_kv_heads", "multi_query_group_num", default=0)
    ) or (1 if config.get("multi_query") else heads)
    head_dim = int(_first(config, "head_dim", default=hidden // heads))
    return 2 * layers * kv_heads * head_dim, heads, kv_heads


def size_from_config(
    name: str,
    config: Mapping[str, Any],
    *,
    dtype: str = "auto",
    params: int | None = None,
    checkpoint_params: int | None = None,
    checkpoint_bytes: int | None = None,
    checkpoint_source: str = "",
) -> ModelSize:
    """The pure part of sizing: config.json contents plus whatever the checkpoint told us."""
    full = text_config(config)
    notes: list[str] = []
    stored = config_dtype(config) or config_dtype(full) or "bfloat16"
    compute = stored if dtype == "auto" else dtype
    if dtype == "auto" and stored == "float32":
        compute = "bfloat16"
        notes.append("float32 checkpoint: vLLM serves it in 16 bits with --dtype auto")
    kv_elements, heads, kv_heads = kv_shape(full)
    bits = quantized_bits(full)
    experts = num_experts(full)
    if experts > 1:
        active = int(_first(full, "num_experts_per_tok", "moe_topk", default=0))
        notes.append(
            f"mixture of experts: all {experts} experts stay in GPU memory"
            + (f" ({active} active per token)" if active else "")
        )
    if params is not None:
        weight_bytes = int(params * (bits / 8 if bits else DTYPE_BYTES[compute]))
        num_params = params
        source = f"--params {human_params(params)}, shape from config.json"
    elif checkpoint_bytes is not None and (bits or compute == stored):
        weight_bytes = checkpoint_bytes
        num_params = checkpoint_params or int(
            checkpoint_bytes / (bits / 8 if bits else DTYPE_BYTES[stored])
        )
        source = f"config.json + {checkpoint_source}"
    elif checkpoint_bytes is not None:
        num_params = checkpoint_params or int(checkpoint_bytes / DTYPE_BYTES[stored])
        weight_bytes = int(num_params * DTYPE_BYTES[compute])
        source = f"config.json + {checkpoint_source}, cast {stored} -> {compute}"
    else:
        num_params = estimate_params(full)
        weight_bytes = int(num_params * (bits / 8 if bits else DTYPE_BYTES[compute]))
        source = "config.json (parameters estimated from the shapes)"
    if bits:
        notes.append(f"quantized checkpoint: {bits:g}-bit weights")
    max_len = int(
        _first(
            full,
            "max_position_embeddings",
            "n_positions",
            "max_seq_len",
            "seq_length",
            "max_sequence_length",
            default=4096,
        )
    )
    return ModelSize(
        name=name,
        weight_bytes=weight_bytes,
        kv_bytes_per_token=int(kv_elements * DTYPE_BYTES[compute]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_model_len=max_len,
        dtype=compute,
        num_params=num_params,
        source=source,
        notes=tuple(notes),
    )


def size_from_params(name: str, params: int, dtype: str = "auto") -> ModelSize:
    """No config anywhere: the nearest published Llama shape stands in for KV cache and heads."""
    compute = "bfloat16" if dtype == "auto" else dtype
    ref = min(REFERENCE_SHAPES, key=lambda r: abs(math.log(params / r.num_params)))
    kv = 2 * ref.num_layers * ref.num_key_value_heads * ref.head_dim * DTYPE_BYTES[compute]
    return ModelSize(
        name=name,
        weight_bytes=int(params * DTYPE_BYTES[compute]),
        kv_bytes_per_token=int(kv),
        num_attention_heads=ref.num_attention_heads,
        num_key_value_heads=ref.num_key_value_heads,
        max_model_len=ref.max_position_embeddings,
        dtype=compute,
        num_params=params,
        source=f"--params {human_params(params)} {compute}",
        notes=(
            f"no config.json found: KV cache and context assumed from {ref.name} "
            f"({ref.num_layers} layers, {ref.num_key_value_heads} KV heads of {ref.head_dim}); "
            "pass the model directory for exact numbers",
        ),
    )


def display_name(model: str) -> str:
    return Path(model.rstrip("/")).name or model


def size_model(
    model: str,
    *,
    params: str | None = None,
    dtype: str = "auto",
    env: Mapping[str, str] | None = None,
    fetch: Fetcher | None = fetch_from_hub,
) -> ModelSize:
    """Size ``model`` (a local directory or a hub name) from local files, the hub, or --params."""
    env = os.environ if env is None else env
    dtype = normalize_dtype(dtype)
    count = parse_params(params) if params is not None else None
    directory = find_model_dir(model, env)
    if directory is None and fetch is not None:
        directory = fetch(model, env)
    name = display_name(model)
    if directory is None:
        if count is None:
            raise ConfigError(
                f"cannot size model {model!r}: no config.json locally or in the Hugging Face "
                f"cache ({hub_cache_dir(env)}) and the hub is unreachable; {SIZE_HINT}"
            )
        return size_from_params(name, count, dtype)
    config = read_config_json(directory)
    checkpoint_params, checkpoint_bytes, source = read_checkpoint(directory)
    try:
        return size_from_config(
            name,
            config,
            dtype=dtype,
            params=count,
            checkpoint_params=checkpoint_params,
            checkpoint_bytes=checkpoint_bytes,
            checkpoint_source=source,
        )
    except ConfigError as exc:
        raise ConfigError(f"{directory / 'config.json'}: {exc}") from None
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ConfigError(
            f"{directory / 'config.json'}: cannot read the model shape ({exc!r}); {SIZE_HINT}"
        ) from None

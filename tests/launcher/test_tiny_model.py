"""The tiny model builder: loadable output, vLLM-compatible shape, byte-identical and idempotent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from vllm_fleet.launcher import tiny_model
from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.tiny_model import (
    MARKER_NAME,
    TinyLlamaSpec,
    build_tiny_model,
    default_tiny_model_dir,
    is_complete,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_config_is_a_llama_with_head_dim_vllm_accepts(built: Path) -> None:
    config = json.loads((built / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] >= 32
    assert config["head_dim"] == config["hidden_size"] // config["num_attention_heads"]


def test_weights_match_the_config(built: Path) -> None:
    config = json.loads((built / "config.json").read_text())
    tensors = load_file(str(built / "model.safetensors"))
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    assert tensors["model.embed_tokens.weight"].shape == (vocab, hidden)
    assert tensors["lm_head.weight"].shape == (vocab, hidden)
    layers = {name.split(".")[2] for name in tensors if name.startswith("model.layers.")}
    assert len(layers) == config["num_hidden_layers"]
    assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (
        config["intermediate_size"],
        hidden,
    )


def test_tokenizer_round_trips_any_text_and_fits_the_vocab(built: Path) -> None:
    config = json.loads((built / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(built / "tokenizer.json"))
    assert tokenizer.get_vocab_size() <= config["vocab_size"]
    text = "Hello, world! Ünïcode and emoji 🚀 survive a byte-level tokenizer."
    ids = tokenizer.encode(text).ids
    assert ids[0] == config["bos_token_id"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.token_to_id("</s>") == config["eos_token_id"]


def test_tokenizer_config_has_a_chat_template_and_generic_class(built: Path) -> None:
    tokenizer_config = json.loads((built / "tokenizer_config.json").read_text())
    assert "add_generation_prompt" in tokenizer_config["chat_template"]
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["eos_token"] == "</s>"


def test_build_is_byte_identical_across_directories(built: Path, tmp_path: Path) -> None:
    assert _snapshot(build_tiny_model(tmp_path / "again")) == _snapshot(built)


def test_second_build_keeps_the_existing_files(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "model")
    weights = path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    os.utime(weights, ns=(before - 10**9, before - 10**9))
    assert build_tiny_model(path) == path
    assert weights.stat().st_mtime_ns == before - 10**9


def test_damaged_build_is_rebuilt(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "model")
    good = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(b"truncated")
    assert not is_complete(path)
    build_tiny_model(path)
    assert (path / "model.safetensors").read_bytes() == good
    assert is_complete(path)


def test_other_spec_is_not_complete_and_rebuilds(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "model")
    wider = TinyLlamaSpec(hidden_size=256, num_attention_heads=4)
    assert not is_complete(path, wider)
    build_tiny_model(path, wider)
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 256
    assert is_complete(path, wider)


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="non-empty directory"):
        build_tiny_model(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_empty_directory_is_filled(tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    build_tiny_model(target)
    assert (target / MARKER_NAME).is_file()


def test_head_dim_below_32_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="head_dim"):
        build_tiny_model(tmp_path / "m", TinyLlamaSpec(hidden_size=64, num_attention_heads=4))


def test_no_staging_directories_are_left_behind(tmp_path: Path) -> None:
    build_tiny_model(tmp_path / "model")
    build_tiny_model(tmp_path / "model")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_default_dir_honours_the_cache_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_FLEET_CACHE", "/srv/cache")
    assert default_tiny_model_dir() == Path("/srv/cache/tiny-llama")
    monkeypatch.delenv("VLLM_FLEET_CACHE")
    assert default_tiny_model_dir() == Path.home() / ".cache" / "vllm-fleet" / "tiny-llama"


def test_module_entry_point_prints_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tiny_model.main([str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("x")
    assert tiny_model.main([str(tmp_path / "foreign")]) == 2
    assert "non-empty directory" in capsys.readouterr().err


#: the engine image builds the model from the files its Dockerfile copies, nothing else.
ENGINE_DOCKERFILE = Path(__file__).resolve().parents[2] / "compose" / "Dockerfile.engine-cpu"
_BUILD_ALONE = """
import os, runpy, sys
sys.modules["vllm_fleet.router"] = None  # `import vllm_fleet.router...` fails, as in the image
import vllm_fleet.launcher.tiny_model
here = os.path.realpath(os.getcwd())
staged = os.path.realpath(vllm_fleet.launcher.tiny_model.__file__)
assert staged.startswith(here), "not the staged copy"
sys.argv = ["tiny_model", sys.argv[1]]
runpy.run_module("vllm_fleet.launcher.tiny_model", run_name="__main__")
"""


def _tiny_build_copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY into the image's /tmp/tiny staging directory."""
    copies = []
    for line in ENGINE_DOCKERFILE.read_text(encoding="utf-8").splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and words[-1].startswith("/tmp/tiny/"):
            copies.append((words[1:-1], words[-1]))
    return copies


def test_engine_image_builds_the_model_from_launcher_files_alone(tmp_path: Path) -> None:
    """What compose/Dockerfile.engine-cpu does, without Docker: copy exactly its files into an
    empty directory and build there with the router unimportable. Copying router/errors.py
    into the image (as it once did for ConfigError) fails the first assertion."""
    copies = _tiny_build_copies()
    assert copies, f"no COPY into /tmp/tiny in {ENGINE_DOCKERFILE}"
    sources = [src for srcs, _ in copies for src in srcs]
    assert all(src.startswith("launcher/") for src in sources), sources
    root = ENGINE_DOCKERFILE.parents[1]
    stage = tmp_path / "stage"
    for srcs, dest in copies:
        target = stage / dest.removeprefix("/tmp/tiny/")
        target.mkdir(parents=True, exist_ok=True)
        for src in srcs:
            shutil.copy(root / src, target / Path(src).name)
    out = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, "-c", _BUILD_ALONE, str(out)],
        cwd=stage,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert is_complete(out)

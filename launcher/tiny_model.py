"""A tiny random-weight Llama, built locally, so real vLLM can run without downloading a model.

The machines that run the end-to-end tests and the demo have no route to the Hugging Face Hub,
and a CPU has to load and run the model in seconds. So the model is generated here: a byte-level
BPE tokenizer trained on a fixed built-in text and seeded random weights, written in the Hugging
Face layout vLLM reads (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).

Only numpy, tokenizers and safetensors are needed (no torch, no transformers), which keeps the
build quick and usable from the lightweight test environment. Builds are atomic (written to a
sibling temporary directory, then renamed) and idempotent: a marker holds a hash of the recipe
and of every file, and a complete model with the same recipe is never rebuilt.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vllm_fleet.launcher.errors import ConfigError

#: bump when the output changes for the same spec, so old caches are rebuilt.
BUILDER_VERSION = 1
MARKER_NAME = "vllm-fleet-tiny-model.json"
#: the name clients use in requests; vLLM's --served-model-name should use it too.
SERVED_MODEL_NAME = "tiny-llama"

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>")

#: role markers, then the message, then EOS; the prompt ends with the assistant marker.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

#: fixed training text, so the tokenizer (and its merges) is the same on every machine.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A fleet of small servers answers many questions
at once, and a router sends each request to the replica with the shortest queue. Every replica
loads the same model, keeps its own cache of keys and values, and reports how busy it is.
When one server is slow or fails, the router stops sending it work and tries another one.
Hello, world! How are you today? I am fine, thank you. What is the weather like in the city?
It is sunny in the morning and rainy in the evening; bring an umbrella and a warm coat.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024 3.14159 2.71828 42 -7 +13 50% $9.99
Code: def main(): return 0  # comment; for i in range(10): print(i, i * i) if x == y else None
JSON: {"model": "tiny-llama", "messages": [{"role": "user", "content": "Say hello."}]}
Once upon a time there was a little model that could not think, but it could count tokens,
stream them one by one, and stop when it was told to. Its users were tests, and they were happy.
Planning places replicas on devices; launching starts servers; supervising restarts them.
Streaming sends chunks of text as soon as they are ready, and the last chunk says done.
"""


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Shape of the generated model; small enough to load in a second, big enough for vLLM.

    vLLM's CPU attention kernels need head_dim >= 32 (hidden_size / num_attention_heads).
    """

    vocab_size: int = 512
    hidden_size: int = 128
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    num_hidden_layers: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02
    seed: int = 1234

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def recipe_hash(self) -> str:
        """Identifies the build: equal hashes mean byte-identical models."""
        recipe = {"builder": BUILDER_VERSION, "spec": asdict(self), "corpus": _CORPUS}
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def default_tiny_model_dir() -> Path:
    """Per-user cache, so the model is built once and shared by tests, demo and launcher."""
    root = os.environ.get("VLLM_FLEET_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "vllm-fleet"
    return base / "tiny-llama"


def is_complete(path: Path, spec: TinyLlamaSpec | None = None) -> bool:
    """True when `path` holds a finished build of `spec` whose files are unchanged."""
    spec = spec or TinyLlamaSpec()
    try:
        marker = json.loads((path / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("recipe") != spec.recipe_hash():
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    return all(_file_sha256(path / name) == digest for name, digest in files.items())


def build_tiny_model(path: Path, spec: TinyLlamaSpec | None = None) -> Path:
    """Write the tiny model to `path` unless a complete copy is already there; return `path`.

    Safe to call from several processes at once: each builds in its own temporary sibling
    directory and only one rename wins.
    """
    spec = spec or TinyLlamaSpec()
    if spec.head_dim < 32:
        raise ConfigError(
            f"tiny model head_dim is {spec.head_dim}; vLLM's CPU attention needs >= 32: "
            "raise hidden_size or lower num_attention_heads"
        )
    path = path.expanduser().absolute()
    if is_complete(path, spec):
        return path
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.build-", dir=path.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; containers may read it as another user
    try:
        _write_model(staging, spec)
        if is_complete(path, spec):  # another process finished first
            return path
        _remove_stale(path)
        try:
            staging.rename(path)
        except OSError:
            if not is_complete(path, spec):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _check_replaceable(path: Path) -> None:
    """Refuse to overwrite a directory that is not ours (a typo must not delete user data)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"tiny model path {path} is a file: choose a directory path")
    if any(path.iterdir()) and not (path / MARKER_NAME).exists():
        raise ConfigError(
            f"tiny model path {path} is a non-empty directory without {MARKER_NAME}: "
            "choose a new or empty directory"
        )


def _remove_stale(path: Path) -> None:
    """Clear an empty directory or an older tiny-model build so the new one can take its name."""
    if not path.exists():
        return
    _check_replaceable(path)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def _write_model(out: Path, spec: TinyLlamaSpec) -> None:
    tokenizer_vocab = _write_tokenizer(out, spec)
    if tokenizer_vocab > spec.vocab_size:
        raise ConfigError(
            f"tiny model tokenizer has {tokenizer_vocab} tokens > vocab_size {spec.vocab_size}"
        )
    _write_weights(out / "model.safetensors", spec)
    special_ids = {tok: SPECIAL_TOKENS.index(tok) for tok in (BOS, EOS, PAD)}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": spec.init_std,
        "bos_token_id": special_ids[BOS],
        "eos_token_id": special_ids[EOS],
        "pad_token_id": special_ids[PAD],
        "torch_dtype": "float32",
    }
    generation_config = {
        "bos_token_id": special_ids[BOS],
        "eos_token_id": special_ids[EOS],
        "pad_token_id": special_ids[PAD],
    }
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation_config)
    files = {p.name: _file_sha256(p) for p in sorted(out.iterdir()) if p.is_file()}
    _write_json(out / MARKER_NAME, {"recipe": spec.recipe_hash(), "files": files})


def _write_tokenizer(out: Path, spec: TinyLlamaSpec) -> int:
    """Train a byte-level BPE (every byte encodable, so any prompt works); return its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        # the generic class loads tokenizer.json as is; LlamaTokenizer would rebuild it.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(
        out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    )
    return int(tokenizer.get_vocab_size(with_added_tokens=True))


def _write_weights(file: Path, spec: TinyLlamaSpec) -> None:
    """Seeded normal weights with unit norms, named as transformers' LlamaForCausalLM names them."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(spec.seed)
    hidden, inter = spec.hidden_size, spec.intermediate_size
    kv_dim = spec.num_key_value_heads * spec.head_dim

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * spec.init_std).astype(np.float32)

    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal(spec.vocab_size, hidden)}
    for layer in range(spec.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.input_layernorm.weight"] = np.ones(hidden, dtype=np.float32)
        tensors[f"{prefix}.self_attn.q_proj.weight"] = normal(hidden, hidden)
        tensors[f"{prefix}.self_attn.k_proj.weight"] = normal(kv_dim, hidden)
        tensors[f"{prefix}.self_attn.v_proj.weight"] = normal(kv_dim, hidden)
        tensors[f"{prefix}.self_attn.o_proj.weight"] = normal(hidden, hidden)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = np.ones(hidden, dtype=np.float32)
        tensors[f"{prefix}.mlp.gate_proj.weight"] = normal(inter, hidden)
        tensors[f"{prefix}.mlp.up_proj.weight"] = normal(inter, hidden)
        tensors[f"{prefix}.mlp.down_proj.weight"] = normal(hidden, inter)
    tensors["model.norm.weight"] = np.ones(hidden, dtype=np.float32)
    tensors["lm_head.weight"] = normal(spec.vocab_size, hidden)
    save_file(tensors, str(file), metadata={"format": "pt"})
    file.chmod(0o644)


def _write_json(file: Path, data: object) -> None:
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _file_sha256(file: Path) -> str | None:
    try:
        return hashlib.sha256(file.read_bytes()).hexdigest()
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_fleet.launcher.tiny_model",
        description="Build the tiny random-weight Llama used by the CPU demo and e2e tests.",
    )
    parser.add_argument(
        "path",
        nargs="?",
        type=Path,
        default=None,
        help=f"output directory (default: {default_tiny_model_dir()})",
    )
    args = parser.parse_args(argv)
    try:
        path = build_tiny_model(args.path or default_tiny_model_dir())
    except ConfigError as exc:
        print(f"tiny_model: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

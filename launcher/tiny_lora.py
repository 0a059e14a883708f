"""A tiny LoRA adapter for the tiny model (``vllm_fleet.launcher.tiny_model``), so real vLLM can
be tested serving an adapter without the Hub or peft.

A PEFT LoRA adapter is two files: ``adapter_config.json`` (rank, alpha, target modules) and
``adapter_model.safetensors`` with ``lora_A`` (rank x in) and ``lora_B`` (out x rank) for every
targeted projection, named after the base model's weights with PEFT's ``base_model.model.``
prefix. Both are written here with numpy and safetensors, seeded, atomically, like the model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from vllm_fleet.launcher.tiny_model import TinyLlamaSpec

#: rank of the adapter; vLLM's default --max-lora-rank (16) takes it.
RANK = 8
TARGETS = ("q_proj", "v_proj")


def build_tiny_lora(path: Path, base_model: Path, spec: TinyLlamaSpec | None = None) -> Path:
    """Write the adapter to ``path`` (replaced if present) for the model built from ``spec``."""
    from safetensors.numpy import save_file

    spec = spec or TinyLlamaSpec()
    rng = np.random.default_rng(spec.seed + 1)
    kv_dim = spec.num_key_value_heads * spec.head_dim
    out_dims = {"q_proj": spec.hidden_size, "v_proj": kv_dim}
    tensors: dict[str, np.ndarray] = {}
    for layer in range(spec.num_hidden_layers):
        for target in TARGETS:
            name = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            a = rng.standard_normal((RANK, spec.hidden_size), dtype=np.float32) * 0.02
            b = rng.standard_normal((out_dims[target], RANK), dtype=np.float32) * 0.02
            tensors[f"{name}.lora_A.weight"] = a.astype(np.float32)
            tensors[f"{name}.lora_B.weight"] = b.astype(np.float32)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "base_model_name_or_path": str(base_model),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path

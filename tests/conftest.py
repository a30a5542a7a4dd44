import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run through the interpreter on CPU (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hsa_lightning.model.config import ModelConfig
from hsa_lightning.model.hsalm import HSALM
from hsa_lightning.registry import load_plugins, registry

ROOT = Path(__file__).resolve().parents[1]
load_plugins()


def plugin(kind: str, name: str, **kwargs):
    return registry(kind).get(name)(**kwargs)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, hsa_kv_heads=2,
                chunk_size=8, top_k=2, window=6)
    base.update(overrides)
    return ModelConfig(**base)


def build_model(attention="HSAReference", layout=("UltraLong", {"groups": 1}), seed=0, dtype=torch.float64,
                ffn=("SwiGLU", {}), **overrides) -> HSALM:
    name, args = layout if isinstance(layout, tuple) else (layout, {})
    torch.manual_seed(seed)
    model = HSALM(tiny_config(**overrides), plugin("attention", attention), plugin("layout", name, **args),
                  plugin("position", "RoPE"), plugin("ffn", ffn[0], **ffn[1]))
    return model.to(dtype)


def child_env(**extra) -> dict:
    """The environment for a subprocess. In-process tests leave RANK / LOCAL_RANK / WORLD_SIZE set
    (StreamingDataModule exports them for streaming); a child that inherits them thinks an external
    launcher started it and never spawns its other ranks."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    return {**env, "PYTHONWARNINGS": "ignore", **extra}


def run_cli(args, tmp_path, timeout=600, env_extra=None):
    """Run ``python cli.py ...`` in a subprocess from the repository root."""
    import subprocess

    env = child_env(**(env_extra or {}))
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield

"""``python cli.py generate``: continue a prompt file with a trained checkpoint.

    python cli.py generate --config configs/demo_gpu.yaml --ckpt_path runs/.../last.ckpt \
        --prompt_file prompt.txt --max_new_tokens 64

The model is rebuilt from the config's ``model:`` section (the same YAML ``fit`` ran with) and loaded
with the checkpoint's weights; the tokenizer is the data section's ``tokenizer`` unless given. The
continuation goes to stdout, timings to stderr.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

from hsa_lightning.errors import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cli.py generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the training YAML (its model section builds the model)")
    p.add_argument("--ckpt_path", required=True, help="Lightning checkpoint with the trained weights")
    p.add_argument("--prompt_file", required=True, help="UTF-8 text to continue")
    p.add_argument("--tokenizer", help="'byte' or a tokenizer.json (default: the config's data tokenizer, else byte)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (one token); repeatable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--segment_len", type=int, default=16384, help="prompt tokens per prefill step")
    p.add_argument("--offload", action="store_true", help="keep the chunk K/V in pinned host memory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    return p.parse_args(argv)


def load_model(config_path: str, ckpt_path: str | None, device: torch.device, dtype: torch.dtype):
    """HSALM built from a training YAML's model section, with a checkpoint's weights (None: fresh init)."""
    from hsa_lightning.params import lit_module

    module = lit_module(config_path)
    module.attention.check_runtime(device, dtype)
    module.model = module.build_model()
    if ckpt_path is not None:
        module.load_weights(ckpt_path)  # with a clear error when the checkpoint does not match
    return module.model.to(device=device, dtype=dtype)


def main(argv: list[str]) -> None:
    from hsa_lightning.data.tokenizer import load_tokenizer
    from hsa_lightning.inference.engine import InferenceEngine

    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    for name in ("config", "ckpt_path", "prompt_file"):
        if not Path(getattr(args, name)).is_file():
            raise ConfigError(f"--{name} {getattr(args, name)!r} is not a file")
    model = load_model(args.config, args.ckpt_path, device, dtype)
    tokenizer = load_tokenizer(args.tokenizer or _data_tokenizer(args.config) or "byte")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the model only "
                          f"vocab_size={model.config.vocab_size}; pass the tokenizer it was trained with")
    prompt = tokenizer.encode(Path(args.prompt_file).read_text(encoding="utf-8"))
    if not prompt:
        raise ConfigError(f"--prompt_file {args.prompt_file!r} is empty")
    stops = []
    for s in args.stop:
        ids = tokenizer.encode(s)
        if len(ids) != 1:
            raise ConfigError(f"--stop {s!r} is {len(ids)} tokens; a stop string must be exactly one token")
        stops += ids
    engine = InferenceEngine(model, max_tokens=len(prompt) + args.max_new_tokens, segment_len=args.segment_len,
                             offload=args.offload)
    ids = torch.tensor([prompt], device=device)
    start = time.perf_counter()
    out = engine.generate(ids, args.max_new_tokens, args.temperature, args.top_p, stops, args.seed)[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    took = time.perf_counter() - start
    print(tokenizer.decode(out))
    print(f"[generate] prompt {len(prompt):,} tokens, {len(out)} new tokens in {took:.2f} s "
          f"({(len(prompt) + len(out)) / took:,.0f} tokens/s overall) on {device} {str(dtype).split('.')[-1]}",
          file=sys.stderr)


def _data_tokenizer(config_path: str) -> str | None:
    data = (yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}).get("data") or {}
    return (data.get("init_args") or {}).get("tokenizer") if isinstance(data, dict) else None

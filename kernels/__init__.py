"""HSA operators: pure functions over tensors (no nn.Module, no config). Installed as hsa_lightning.kernels.

Each operator keeps its executable spec (``naive.py``) beside any fast path, fla-style.
"""

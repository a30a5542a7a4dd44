"""Chunked prefill, decode, generation and offload for trained HSALM models (DESIGN section 9)."""
from hsa_lightning.inference.engine import InferenceEngine

__all__ = ["InferenceEngine"]

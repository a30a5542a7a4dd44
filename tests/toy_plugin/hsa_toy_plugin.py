"""A third-party attention backend: HSA with a configurable sharpness of the intra-chunk softmax."""
import math

from hsa_lightning.kernels.hsa import hsa_attention_reference
from hsa_lightning.model.attention_backend import AttentionBackend


class ToyAttention(AttentionBackend):
    fusions = frozenset({"softmax", "stick_breaking"})

    def __init__(self, sharpness: float = 1.0):
        self.sharpness = sharpness

    def memory_attention(self, q, memory, selection):
        scale = self.sharpness / math.sqrt(q.shape[-1])
        return hsa_attention_reference(q, memory.k, memory.v, selection.weights, selection.indices,
                                       memory.chunk_size, scale=scale)

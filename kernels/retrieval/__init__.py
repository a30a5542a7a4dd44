from hsa_lightning.kernels.retrieval.naive import (
    fusion_weights,
    retrieval_scores,
    select_chunks,
    weights_from_selected,
    with_successors,
)

__all__ = ["fusion_weights", "retrieval_scores", "select_chunks", "weights_from_selected", "with_successors"]

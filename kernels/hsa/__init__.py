from hsa_lightning.kernels.hsa.naive import hsa_attention_reference, joint_chunk_attention_reference

__all__ = ["hsa_attention_reference", "joint_chunk_attention_reference"]

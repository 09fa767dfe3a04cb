"""Triton kernels (FlashAttention-2, sparse attention, K-SEQ selection, CATS sparse MLP)."""

from srl.kernels.cats import cats_mlp, cats_mlp_reference
from srl.kernels.flash_attention import attention_reference, flash_attention, flash_decode
from srl.kernels.sparse_attention import (BlockLayout, S2Cache, S2Strided, SinkWindow, SinkWindowCache,
                                          sparse_attention, sparse_decode)

__all__ = ["flash_attention", "flash_decode", "attention_reference", "sparse_attention", "sparse_decode",
           "SinkWindow", "S2Strided", "BlockLayout", "SinkWindowCache", "S2Cache", "cats_mlp", "cats_mlp_reference"]

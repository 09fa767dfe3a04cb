"""Triton kernels (FlashAttention-2, sparse attention, K-SEQ selection, CATS sparse MLP)."""

from srl.kernels.cats import cats_mlp, cats_mlp_reference
from srl.kernels.sparse_attention import (BlockLayout, S2Cache, S2Strided, SinkWindow, SinkWindowCache,
                                          sparse_attention, sparse_decode)

__all__ = ["sparse_attention", "sparse_decode", "SinkWindow", "S2Strided", "BlockLayout", "SinkWindowCache",
           "S2Cache", "cats_mlp", "cats_mlp_reference"]

"""Triton kernels; public names load lazily, so importing the package does not import Triton."""

_SPARSE = ("sparse_attention", "SinkWindow", "S2Strided", "BlockLayout", "sparse_decode", "SinkWindowCache", "S2Cache")


def __getattr__(name):
    if name in _SPARSE:
        from srl.kernels import sparse_attention as _sparse
        return getattr(_sparse, name)
    raise AttributeError(f"module 'srl.kernels' has no attribute {name!r}")

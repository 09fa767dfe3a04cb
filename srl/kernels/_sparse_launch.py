"""Cached kernel launches for sparse attention: the host work of a call cut to the minimum.

A call of ``kernel[grid](*args, **constexprs)`` makes Triton bind ~40 arguments to the signature,
specialize each (type, 16-byte alignment, value == 1), hash the result into a cache key, find
the compiled kernel and build launch metadata, every time. For a ~1.3 ms kernel that is a
measurable part of the per-call time. :class:`CachedLaunch` does this once: the first call goes
through Triton as usual and keeps the compiled kernel; later calls hand the arguments straight
to its launcher. That is only valid while the specialization cannot change, so the caller keys
its ``CachedLaunch`` on everything it depends on: shapes, strides, dtypes, device, pattern, tile
choice and the 16-byte alignment of every tensor's data pointer (``signature``).

Under the interpreter, with launch hooks installed (profilers), on another current device than
the first call's, or on a Triton whose launch path has not been checked (``_DIRECT_TRITON``: the
launcher's argument order is internal to Triton), every call takes Triton's own path.
"""

from __future__ import annotations

import inspect

import torch

from srl.kernels._flash_common import INTERPRET

_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")  # launch options, not kernel parameters
_DIRECT_TRITON = ((3, 6), (3, 9))  # the Triton versions whose launch path this mirrors (3.6 on the H200)


def _triton_checked() -> bool:
    import triton
    version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    return _DIRECT_TRITON[0] <= version <= _DIRECT_TRITON[1]


def signature(tensors) -> list:
    """Shape, strides and 16-byte alignment of the data pointer (Triton specializes pointers on
    it) of each tensor: what a cached launch's specialization depends on besides dtype and device."""
    out = []
    for t in tensors:
        out += (t.shape, t.stride(), t.data_ptr() % 16 == 0)
    return out


try:
    from triton import knobs as _knobs
except ImportError:  # an older Triton: always take its own path
    _knobs = None


def _hooks_off() -> bool:
    """No launch hooks are installed (Triton 3.6+ keeps them as chains that may be empty)."""
    if _knobs is None:
        return False
    rt = _knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


class CachedLaunch:
    """``kernel[grid](*args, **consts)`` whose compiled kernel is looked up once.

    ``args`` are the positional (runtime) arguments; ``consts`` the constexpr keyword arguments
    and launch options. The compiled kernel's launcher takes every kernel parameter in
    signature order, so the constexpr values (with the kernel's defaults) are bound once, the
    same way Triton's binder does (``inspect.Signature.bind`` then ``apply_defaults``).
    """

    __slots__ = ("kernel", "grid", "consts", "compiled", "tail", "device", "direct")

    def __init__(self, kernel, grid: tuple[int, ...], consts: dict, direct: bool = True):
        self.kernel, self.consts = kernel, consts
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.compiled = None
        self.tail: tuple = ()
        self.device = None
        self.direct = direct and not INTERPRET and _TRITON_CHECKED

    def __call__(self, *args) -> None:
        ck = self.compiled
        if ck is not None:
            drv = _driver()
            dev = drv.get_current_device()
            if dev == self.device and _hooks_off():
                g = self.grid
                ck.run(g[0], g[1], g[2], drv.get_current_stream(dev), ck.function, ck.packed_metadata, None, None,
                       None, *args, *self.tail)
                return
        out = self.kernel[self.grid](*args, **self.consts)
        if self.direct and self.compiled is None:
            self._adopt(out, args)

    def _adopt(self, compiled, args) -> None:
        """Keep the compiled kernel and the bound constexpr tail, if this Triton exposes them."""
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            return
        self.tail = bind_tail(self.kernel.fn, args, self.consts)
        self.device = _driver().get_current_device()
        self.compiled = compiled


def bind_tail(fn, args: tuple, consts: dict) -> tuple:
    """Values of ``fn``'s parameters after the positional ``args``: ``consts`` where given, else
    the parameter's default (launch options such as num_warps are not parameters)."""
    sig = inspect.signature(fn)
    bound = sig.bind(*args, **{k: v for k, v in consts.items() if k not in _OPTIONS})
    bound.apply_defaults()
    return tuple(bound.arguments.values())[len(args):]


_DRIVER = []
_TRITON_CHECKED = _triton_checked()


def _driver():
    if not _DRIVER:
        import triton
        _DRIVER.append(triton.runtime.driver.active)
    return _DRIVER[0]

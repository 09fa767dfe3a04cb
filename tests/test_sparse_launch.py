"""Cached launches of the sparse kernels (``_sparse_launch.py``) and the per-signature plans of
``sparse_attention.py``: the first call of a signature goes through Triton, later ones straight
to the compiled kernel's launcher with every parameter bound as Triton binds them; a plan is
reused only for the same shapes, strides, alignment, dtype, pattern and tiles.
"""

import inspect
import os
import sys

import pytest
import torch

_CPU = not torch.cuda.is_available()
_LATE = _CPU and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and "triton" in sys.modules
if _CPU:
    os.environ["TRITON_INTERPRET"] = "1"

from srl.kernels import _sparse_launch as SL  # noqa: E402
from srl.kernels._sparse_ranges import _range_bwd_dkdv, _range_fwd  # noqa: E402
from srl.kernels.sparse_attention import TILE_OVERRIDE, S2Strided, SinkWindow, sparse_attention  # noqa: E402
from tests.test_sparse_attention import TOL, check_against_reference, make_qkv, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(_LATE, reason="triton was imported before TRITON_INTERPRET was set")
SA = sys.modules["srl.kernels.sparse_attention"]


def _kernel(a, b, X: int = 0, Y: int = 5, Z: int = 7):  # a stand-in kernel signature
    pass


class _Compiled:
    function, packed_metadata = "fn", "meta"

    def __init__(self, log):
        self.log = log

    def run(self, *args):
        self.log.append(("direct", args))


class _Kernel:
    """Records launches like ``kernel[grid](*args, **consts)`` and returns a compiled kernel."""
    fn = staticmethod(_kernel)

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, **consts):
            self.log.append(("triton", grid, args, consts))
            return _Compiled(self.log)
        return launch


class _Driver:
    def __init__(self):
        self.device = 0

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device):
        return 100 + device


@pytest.fixture
def fake_launch(monkeypatch):
    driver = _Driver()
    monkeypatch.setattr(SL, "_DRIVER", [driver])
    monkeypatch.setattr(SL, "INTERPRET", False)
    monkeypatch.setattr(SL, "_TRITON_CHECKED", True)
    return driver


def test_bind_tail_matches_the_signature_with_defaults():
    names = list(inspect.signature(_range_fwd.fn).parameters)
    n_pos = names.index("KIND")
    tail = SL.bind_tail(_range_fwd.fn, tuple(range(n_pos)), {"KIND": 1, "HEAD_DIM": 32, "UPCAST": False, "TMA": True,
                                                           "PRE_TMA": False, "BLOCK_M": 64, "BLOCK_N": 32,
                                                           "PRE_N": 32, "num_warps": 4, "num_stages": 2})
    assert names[-2:] == ["HEADS_FAST", "DESC_DEV"] and len(names) == n_pos + 10
    assert tail == (1, 32, False, True, False, 64, 32, 32, False, False)  # defaults filled, options left out
    with pytest.raises(TypeError):  # a constexpr the kernel does not have
        SL.bind_tail(_range_bwd_dkdv.fn, (0,) * 34, {"NOT_A_PARAM": 1})


def test_second_call_goes_straight_to_the_launcher(fake_launch):
    kernel = _Kernel()
    launch = SL.CachedLaunch(kernel, (3, 2), {"Y": 9, "num_warps": 4})
    launch("a0", "b0")
    launch("a1", "b1")
    assert kernel.log[0] == ("triton", (3, 2, 1), ("a0", "b0"), {"Y": 9, "num_warps": 4})
    assert kernel.log[1] == ("direct", (3, 2, 1, 100, "fn", "meta", None, None, None, "a1", "b1", 0, 9, 7))


def test_other_device_or_launch_hooks_take_tritons_path(fake_launch, monkeypatch):
    kernel = _Kernel()
    launch = SL.CachedLaunch(kernel, (1,), {})
    launch(1, 2)
    fake_launch.device = 1  # another current device: Triton picks (or compiles) its kernel
    launch(3, 4)
    assert [entry[0] for entry in kernel.log] == ["triton", "triton"]
    fake_launch.device = 0
    monkeypatch.setattr(SL, "_hooks_off", lambda: False)  # a profiler's hooks must see the launch
    launch(5, 6)
    assert [entry[0] for entry in kernel.log] == ["triton"] * 3
    SL.CachedLaunch(kernel, (1,), {}, direct=False)(7, 8)  # direct off: never adopts
    assert kernel.log[-1][0] == "triton"


def test_unchecked_triton_versions_keep_tritons_path(fake_launch, monkeypatch):
    import triton
    for version, checked in (("3.6.0", True), ("3.9.1+git1234", True), ("3.5.0", False), ("3.10.0", False)):
        monkeypatch.setattr(triton, "__version__", version)
        assert SL._triton_checked() is checked
    monkeypatch.setattr(SL, "_TRITON_CHECKED", False)
    kernel = _Kernel()
    launch = SL.CachedLaunch(kernel, (1,), {})
    launch(1, 2)
    launch(3, 4)
    assert [entry[0] for entry in kernel.log] == ["triton", "triton"]


def test_hooks_off_without_hooks():
    assert SL._hooks_off() is (SL._knobs is not None)


def test_plans_follow_strides_alignment_and_tiles():
    """Same shapes, other strides (a transposed copy seen as the same shape) and another tile
    override: each call gets its own plan and matches the float64 reference; a plan keyed on
    one signature is reused by a call with new tensors of that signature."""
    SA._PLANS.clear()
    q, k, v = make_qkv(1, 2, 1, 70, 70, 16, torch.float32, seed=3)
    pattern = SinkWindow(8, 20)
    check_against_reference(q, k, v, pattern, TOL[torch.float32])
    n_plans = len(SA._PLANS)
    assert n_plans == 2  # forward, backward
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    assert qt.stride() != q.stride()
    check_against_reference(qt, kt, vt, pattern, TOL[torch.float32])
    assert len(SA._PLANS) == 2 * n_plans
    q2, k2, v2 = make_qkv(1, 2, 1, 70, 70, 16, torch.float32, seed=4)
    check_against_reference(q2, k2, v2, pattern, TOL[torch.float32])
    assert len(SA._PLANS) == 2 * n_plans
    TILE_OVERRIDE["fwd"] = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, RANGES=True)
    try:
        with torch.no_grad():
            out = sparse_attention(q2, k2, v2, pattern)
    finally:
        TILE_OVERRIDE.clear()
    assert len(SA._PLANS) == 2 * n_plans + 1
    ref = SA.sparse_attention_reference(q2.double(), k2.double(), v2.double(), pattern)
    assert rel_err(out, ref) < TOL[torch.float32]
    wrong = SA.sparse_attention_reference(q2.double(), k2.double(), v2.double(), S2Strided(16, 1, 2))
    assert rel_err(out, wrong) > 1e-3  # negative control: another pattern's result is far


def test_checks_run_once_per_signature_and_still_reject_bad_calls():
    q, k, v = make_qkv(1, 2, 1, 40, 40, 16, torch.float32, seed=1)
    pattern = SinkWindow(4, 8)
    with torch.no_grad():
        for _ in range(2):  # the second call skips the checks: same signature
            sparse_attention(q, k, v, pattern)
        with pytest.raises(ValueError, match="Nq <= Nk"):
            sparse_attention(q, k[:, :, :30], v[:, :, :30], pattern)
        with pytest.raises(ValueError, match="dtype"):
            sparse_attention(q.double(), k, v, pattern)
        with pytest.raises(ValueError, match="torch.Tensor"):
            sparse_attention(q.tolist(), k, v, pattern)
        with pytest.raises(ValueError, match="pattern"):
            sparse_attention(q, k, v, [4, 8])


@pytest.mark.gpu
@pytest.mark.skipif(_CPU, reason="needs a CUDA device")
def test_gpu_direct_launch_repeats_the_first_call():
    """On the GPU the second call of a signature takes the direct path, bit for bit the first
    call's result (forward and the three gradients), both against the float64 reference."""
    SA._PLANS.clear()
    q, k, v = make_qkv(1, 4, 2, 1500, 1500, 128, torch.bfloat16, seed=5)
    do = torch.randn_like(q)
    pattern = SinkWindow(64, 512)
    outs = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        o = sparse_attention(q, k, v, pattern)
        o.backward(do)
        outs.append([o.detach().clone()] + [t.grad.clone() for t in (q, k, v)])
    launches = [p.launch for p in SA._PLANS.values() if isinstance(p, SA._Plan)]
    launches += [p.launch for ps in SA._PLANS.values() if isinstance(ps, tuple) and not isinstance(ps, SA._Plan)
                 for p in ps]
    assert launches and all(launch.compiled is not None for launch in launches)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    for t in (q, k, v):  # the third call (direct again) against the reference; gradients would accumulate
        t.grad = None
    check_against_reference(q, k, v, pattern, TOL[torch.bfloat16])

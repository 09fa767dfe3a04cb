"""FlashAttention kernels against the float64 reference.

Without CUDA the Triton kernels run in the interpreter (TRITON_INTERPRET=1) at
small shapes; bf16 there goes through load-then-upcast because the interpreter's
bf16 ``tl.dot`` is wrong. Tests marked ``gpu`` run the compiled kernels.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

_CPU = not torch.cuda.is_available()
# Triton picks interpreted or compiled code when it is imported: if something imported
# it before this file could set TRITON_INTERPRET, run this file again in a fresh process.
_LATE = _CPU and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and "triton" in sys.modules
if _CPU:
    os.environ["TRITON_INTERPRET"] = "1"

import srl.kernels._flash_common as _common  # noqa: E402
from srl.kernels.flash_attention import attention_reference, flash_attention, flash_decode  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _fresh_interpreter_only(request):
    if _LATE and request.node.originalname != "test_interpreter_suite_in_fresh_process":
        pytest.skip("triton was imported before TRITON_INTERPRET was set: see test_interpreter_suite_in_fresh_process")


@pytest.mark.skipif(not _LATE, reason="only needed when triton was imported before this file")
def test_interpreter_suite_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_kernels_are_exercised_not_the_reference():
    # on CPU the comparisons below would be vacuous if dispatch fell back to the reference
    assert torch.cuda.is_available() or _common.INTERPRET
# float32 is exact in the interpreter but runs tf32 matmuls on the GPU
TOL = {torch.float32: 1e-5 if _CPU else 5e-3, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_qkv(b, h, h_kv, n_q, n_k, d, dtype, device=DEV, seed=0, layout="bhnd", scale=1.0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(heads, n):
        if layout == "bnhd":  # (B, N, H, D) storage seen as (B, H, N, D): non-standard strides
            t = torch.randn(b, n, heads, d, generator=gen).transpose(1, 2)
        else:
            t = torch.randn(b, heads, n, d, generator=gen)
        return (t * scale).to(device=device, dtype=dtype).requires_grad_()

    return rand(h, n_q), rand(h_kv, n_k), rand(h_kv, n_k)


def reference_with_grads(q, k, v, do, causal, sm_scale=None, kv_start=None):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = attention_reference(q64, k64, v64, causal=causal, sm_scale=sm_scale, kv_start=kv_start)
    out.backward(do.double())
    return out, q64.grad, k64.grad, v64.grad


def run_kernel(q, k, v, causal, sm_scale=None, seed=1, kv_start=None):
    out = flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, kv_start=kv_start)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    do = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
    out.backward(do)
    return out, q.grad, k.grad, v.grad, do


def check_against_reference(q, k, v, causal, tol, kv_start=None):
    out, dq, dk, dv, do = run_kernel(q, k, v, causal, kv_start=kv_start)
    ref = reference_with_grads(q, k, v, do, causal, kv_start=kv_start)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref):
        assert got.shape == want.shape, name
        assert torch.isfinite(got).all(), f"{name} has NaN/inf"
        err = rel_err(got, want)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
    return out, dq, dk, dv


# (B, H, H_kv, Nq, Nk, D, causal, dtype, layout)
CASES = {
    "square_fp16": (1, 2, 2, 128, 128, 64, False, torch.float16, "bhnd"),
    "ragged_causal_fp16": (1, 2, 2, 200, 200, 64, True, torch.float16, "bhnd"),
    "gqa_short_queries_causal": (1, 4, 1, 64, 200, 32, True, torch.float16, "bhnd"),
    "nq_gt_nk_causal_fp32": (2, 2, 1, 200, 72, 32, True, torch.float32, "bhnd"),
    "nq_ne_nk_strided_fp32": (1, 2, 2, 72, 200, 32, False, torch.float32, "bnhd"),
    "d128_bf16_upcast": (1, 2, 2, 128, 192, 128, True, torch.bfloat16, "bhnd"),
    "d16_gqa_fp16": (1, 4, 2, 40, 40, 16, False, torch.float16, "bhnd"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_and_gradients_match_float64_reference(case):
    b, h, h_kv, n_q, n_k, d, causal, dtype, layout = CASES[case]
    q, k, v = make_qkv(b, h, h_kv, n_q, n_k, d, dtype, layout=layout, seed=list(CASES).index(case))
    check_against_reference(q, k, v, causal, TOL[dtype])


def test_rows_that_see_no_key_are_zero_not_nan():
    # Nq > Nk causal, bottom-right aligned: query i sees key j iff j <= i - (Nq - Nk)
    n_q, n_k = 200, 72
    q, k, v = make_qkv(1, 2, 2, n_q, n_k, 32, torch.float16, seed=3)
    out, dq, dk, dv = check_against_reference(q, k, v, True, TOL[torch.float16])
    blind = n_q - n_k
    assert torch.equal(out[:, :, :blind], torch.zeros_like(out[:, :, :blind]))
    assert torch.equal(dq[:, :, :blind], torch.zeros_like(dq[:, :, :blind]))
    assert out[:, :, blind:].abs().sum() > 0


def test_huge_logits_stay_finite_and_accurate():
    # |s| up to ~1e4: a softmax without max subtraction overflows
    q, k, v = make_qkv(1, 2, 2, 200, 200, 64, torch.float16, seed=4, scale=12.0)
    out, dq, dk, dv, do = run_kernel(q, k, v, causal=True)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    ref = attention_reference(q.detach().double(), k.detach().double(), v.detach().double(), causal=True)
    assert rel_err(out, ref) <= TOL[torch.float16]


@pytest.mark.skipif(not _CPU, reason="sets the interpreter's forward tile options")
def test_lazy_rescale_option_matches_reference(monkeypatch):
    fa = importlib.import_module("srl.kernels.flash_attention")  # the module: srl.kernels.flash_attention is the function

    monkeypatch.setitem(fa._INTERP_FWD_TILES, "LAZY_RESCALE", True)
    q, k, v = make_qkv(1, 2, 1, 200, 256, 64, torch.float32, seed=9, scale=2.0)
    with torch.no_grad():
        k += torch.linspace(0, 6, 256)[None, None, :, None]  # maxima that grow along the keys
        for causal in (False, True):
            out = flash_attention(q, k, v, causal=causal)
            ref = attention_reference(q.double(), k.double(), v.double(), causal=causal)
            assert rel_err(out, ref) <= TOL[torch.float32]


# (B, H, H_kv, Nq, Nk, D, causal, dtype, layout); B*H_kv rows map to KV heads in both ways
TMA_CASES = {
    "ragged_causal_fp16": (1, 2, 2, 200, 200, 64, True, torch.float16, "bhnd"),
    "gqa_heads_in_batch_fp16": (2, 2, 1, 72, 200, 32, False, torch.float16, "bhnd"),
    "gqa_heads_in_group_causal_bf16": (1, 4, 2, 200, 72, 64, True, torch.bfloat16, "bhnd"),
    "unmergeable_strides_fall_back": (2, 2, 2, 200, 200, 32, True, torch.float32, "bnhd"),
}


@pytest.mark.skipif(not _CPU, reason="sets the interpreter's forward tile options")
@pytest.mark.parametrize("case", list(TMA_CASES), ids=list(TMA_CASES))
def test_tma_option_matches_reference(case, monkeypatch):
    fa = importlib.import_module("srl.kernels.flash_attention")  # the module: srl.kernels.flash_attention is the function

    monkeypatch.setitem(fa._INTERP_FWD_TILES, "TMA", True)
    b, h, h_kv, n_q, n_k, d, causal, dtype, layout = TMA_CASES[case]
    q, k, v = make_qkv(b, h, h_kv, n_q, n_k, d, dtype, layout=layout, seed=20 + list(TMA_CASES).index(case))
    descriptors = fa._tma_descriptors(q, k, v, torch.empty_like(q, memory_format=torch.contiguous_format), 64, 64)
    assert (descriptors is None) == (layout == "bnhd")  # B > 1 and H > 1 rows do not merge in (B, N, H, D)
    check_against_reference(q, k, v, causal, TOL[dtype])


# (B, H, H_kv, Nq, Nk, D, causal, dtype): per-row key starts on top of the causal mask
KV_START_CASES = {
    "causal_window_fp32": (2, 2, 2, 130, 194, 32, True, torch.float32),
    "gqa_noncausal_fp16": (2, 4, 2, 72, 150, 64, False, torch.float16),
    "bf16_upcast_causal": (1, 2, 1, 64, 64, 32, True, torch.bfloat16),
}


def random_starts(b, n_q, n_k, causal, seed):
    """Per-row starts: sliding windows cut by random episode starts, some rows blind."""
    gen = torch.Generator().manual_seed(seed)
    last = torch.arange(n_q) + (n_k - n_q) if causal else torch.full((n_q,), n_k - 1)
    width = torch.randint(1, n_k, (b, n_q), generator=gen)
    start = (last[None] - width + 1).clamp_min(0)
    start[:, ::17] = n_k + 3  # rows that see no key at all
    return start.to(torch.int64)


@pytest.mark.parametrize("case", list(KV_START_CASES), ids=list(KV_START_CASES))
def test_kv_start_forward_and_gradients_match_float64_reference(case):
    b, h, h_kv, n_q, n_k, d, causal, dtype = KV_START_CASES[case]
    seed = 40 + list(KV_START_CASES).index(case)
    q, k, v = make_qkv(b, h, h_kv, n_q, n_k, d, dtype, seed=seed)
    start = random_starts(b, n_q, n_k, causal, seed)
    out, dq, _, _ = check_against_reference(q, k, v, causal, TOL[dtype], kv_start=start)
    blind = start[0] >= n_k
    assert torch.equal(out[0, :, blind], torch.zeros_like(out[0, :, blind]))
    assert torch.equal(dq[0, :, blind], torch.zeros_like(dq[0, :, blind]))
    # negative control: the same call without the starts is far from the reference with them
    with torch.no_grad():
        ref = attention_reference(q.double(), k.double(), v.double(), causal=causal, kv_start=start)
        assert rel_err(flash_attention(q, k, v, causal=causal), ref) > 10 * TOL[dtype]


@pytest.mark.parametrize("n_q", [1, 5, 40])
def test_kv_lens_cache_prefill_and_verify_match_float64_reference(n_q):
    """A cache filled to a different length per row: the causal mask aligns to each row's end,
    rows shorter than the queries see nothing (zeros), keys past the end are never read."""
    b, h, n_k, d = 4, 2, 150, 32
    q, k, v = make_qkv(b, h, 1, n_q, n_k, d, torch.float32, seed=50 + n_q)
    lens = torch.tensor([n_k, 77, n_q + 1, max(n_q - 3, 0)])
    with torch.no_grad():
        k[1, :, 77:] = float("nan")  # past row 1's end: must never be read
        v[1, :, 77:] = float("nan")
        out = flash_attention(q, k, v, causal=True, kv_lens=lens)
        ref = attention_reference(q.double(), k.double().nan_to_num(), v.double().nan_to_num(), causal=True,
                                  kv_lens=lens)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= TOL[torch.float32]
    assert rel_err(out, attention_reference(q.double(), k.double().nan_to_num(), v.double().nan_to_num(),
                                            causal=True)) > 0.1  # negative control: the lens matter


def _tree_layout_bounds(lens, k, L):
    """``srl.generation.decode.tree_layout`` as kernel arguments: valid keys per row (the cache up
    to the last draft token), per-query starts (a draft token's block) and the shared prefix."""
    P = lens
    block = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.arange(k).repeat_interleave(L) * L])
    starts = P[:, None] + block[None, :]
    starts[:, 0] = 0  # x0 sees the prefix only (its causal end is P)
    return P + 1 + k * L, starts, P + 1


@pytest.mark.parametrize("route", ["decode", "forward"])
def test_tree_verification_mask_matches_the_dense_tree_layout(route, monkeypatch):
    """k drafts x L tokens over a shared prefix (speculative verification): kv_lens + kv_start +
    kv_prefix give the same attention as the dense tree mask of the samplers, on the split-KV
    decode kernel (short queries) and on the forward kernel (longer ones)."""
    from srl.generation.decode import tree_layout

    if route == "decode":  # the forward kernel runs the tree pass unless asked
        monkeypatch.setattr(fa_module(), "_DECODE_STARTS", True)

    b, h, d, S, k, L = 3, 2, 32, 96, 3, 4
    lens = torch.tensor([10, 40, 63])
    n_q = 1 + k * L
    q, kk, v = make_qkv(b, h, h, n_q, S, d, torch.float32, seed=60)
    slots, _, mask = tree_layout(lens, k, L, S)
    kv_lens, starts, prefix = _tree_layout_bounds(lens, k, L)
    with torch.no_grad():
        s = torch.matmul(q.double(), kk.double().transpose(-1, -2)) * d ** -0.5
        want = torch.softmax(s.masked_fill(~mask[:, None], float("-inf")), -1) @ v.double()
        got = flash_attention(q, kk, v, causal=True, kv_lens=kv_lens, kv_start=starts, kv_prefix=prefix)
        no_prefix = flash_attention(q, kk, v, causal=True, kv_lens=kv_lens, kv_start=starts)
    assert rel_err(got, want) <= TOL[torch.float32]
    assert rel_err(no_prefix, want) > 0.1  # negative control: drafts must see the prefix


def fa_module():
    return importlib.import_module("srl.kernels.flash_attention")  # the module: the package exports the function


# (B, H, H_kv, Nq, Nk, D, splits): the decode kernel with per-row lengths, starts and a shared prefix
DECODE_TREE_CASES = {
    "mha_one_split_bf16": (3, 2, 2, 13, 96, 32, 1, torch.bfloat16),
    "gqa_three_splits_fp16": (2, 4, 2, 9, 150, 64, 3, torch.float16),
    "gqa_rows_past_one_tile_fp32": (2, 4, 1, 17, 64, 16, 2, torch.float32),
}


@pytest.mark.parametrize("case", list(DECODE_TREE_CASES), ids=list(DECODE_TREE_CASES))
def test_decode_with_starts_and_prefix_matches_float64_reference(case):
    """Random starts (some rows blind, some with starts past their causal end), a random shared
    prefix and ragged lengths, int64 and int32 indices: the decode kernel against float64, and
    negative controls without the prefix and without the starts."""
    b, h, h_kv, n_q, n_k, d, splits, dtype = DECODE_TREE_CASES[case]
    seed = 80 + list(DECODE_TREE_CASES).index(case)
    q, k, v = (t.detach() for t in make_qkv(b, h, h_kv, n_q, n_k, d, dtype, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(n_q, n_k + 1, (b,), generator=gen)
    lens[0] = n_k
    start = torch.randint(0, n_k, (b, n_q), generator=gen)
    start[:, -1] = n_k + 5  # the last row sees the prefix only
    prefix = torch.randint(0, n_k // 2, (b,), generator=gen)
    prefix[-1] = 0  # no prefix: the last row of that batch element sees no key
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True, kv_lens=lens, kv_start=start,
                              kv_prefix=prefix)
    out = flash_decode(q, k, v, kv_lens=lens, kv_start=start, kv_prefix=prefix, num_splits=splits)
    out32 = flash_decode(q, k, v, kv_lens=lens.int(), kv_start=start.int(), kv_prefix=prefix.int(),
                         num_splits=splits)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= TOL[dtype]
    assert torch.equal(out, out32)
    assert torch.equal(out[-1, :, -1], torch.zeros_like(out[-1, :, -1]))
    no_prefix = flash_decode(q, k, v, kv_lens=lens, kv_start=start, num_splits=splits)
    no_start = flash_decode(q, k, v, kv_lens=lens, num_splits=splits)
    assert rel_err(no_prefix, ref) > 10 * TOL[dtype] and rel_err(no_start, ref) > 10 * TOL[dtype]


def test_outputs_and_gradients_keep_the_callers_head_layout():
    """q seen through a transpose of (B, N, H, D) storage (an LM's layout): the output and the
    gradients come back in that storage order, so transposing back to (B, N, H*D) is a view."""
    q, k, v = make_qkv(2, 3, 3, 40, 40, 16, torch.float32, seed=90, layout="bnhd")
    out, dq, dk, dv, do = run_kernel(q, k, v, causal=True)
    for t in (out, dq, dk, dv):
        assert t.transpose(1, 2).is_contiguous()
    ref = reference_with_grads(q, k, v, do, causal=True)
    for got, want in zip((out, dq, dk, dv), ref):
        assert rel_err(got, want) <= TOL[torch.float32]
    with torch.no_grad():
        short = flash_attention(q[:, :, :5], k, v, causal=True)  # the decode kernel
    assert short.transpose(1, 2).is_contiguous()
    assert rel_err(short, attention_reference(q[:, :, :5].double(), k.double(), v.double(), causal=True)) <= 1e-5


def test_forward_only_options_refuse_gradients_and_need_their_partner():
    q, k, v = make_qkv(2, 2, 2, 8, 8, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="forward-only"):
        flash_attention(q, k, v, kv_lens=torch.tensor([8, 4]))
    with torch.no_grad(), pytest.raises(ValueError, match="kv_prefix only applies with kv_start"):
        flash_attention(q, k, v, kv_prefix=torch.tensor([1, 1]))
    with torch.no_grad(), pytest.raises(ValueError, match=r"kv_lens must be an int32/int64 tensor of shape \(B,\)"):
        flash_attention(q, k, v, kv_lens=torch.tensor([1.0, 2.0]))


def test_kv_start_bad_shape_or_dtype_is_one_line_error():
    q, k, v = make_qkv(2, 2, 2, 8, 8, 16, torch.float32, seed=0)
    for bad in (torch.zeros(2, 7, dtype=torch.int64), torch.zeros(2, 8), [0] * 8):
        with pytest.raises(ValueError, match=r"kv_start must be an int32/int64 tensor of shape \(B, Nq\)"):
            flash_attention(q, k, v, kv_start=bad)


def test_negative_control_wrong_scale_fails_tolerance():
    q, k, v = make_qkv(1, 2, 2, 128, 128, 64, torch.float16, seed=5)
    ref = attention_reference(q.detach().double(), k.detach().double(), v.detach().double(), causal=False)
    with torch.no_grad():
        right = flash_attention(q, k, v)
        wrong = flash_attention(q, k, v, sm_scale=1.1 * 64 ** -0.5)
        wrong_mask = flash_attention(q, k, v, causal=True)
    assert rel_err(right, ref) <= TOL[torch.float16]
    assert rel_err(wrong, ref) > 10 * TOL[torch.float16]
    assert rel_err(wrong_mask, ref) > 10 * TOL[torch.float16]


def test_negative_control_gradient_check_detects_a_wrong_dk():
    q, k, v = make_qkv(1, 1, 1, 64, 64, 32, torch.float32, seed=6)
    out, dq, dk, dv, do = run_kernel(q, k, v, causal=True)
    _, _, dk_ref, _ = reference_with_grads(q, k, v, do, causal=True)
    assert rel_err(dk, dk_ref) <= TOL[torch.float32]
    assert rel_err(dk * 1.05, dk_ref) > TOL[torch.float32]  # a 5% error is caught
    assert rel_err(dq, dk_ref) > 0.1


@pytest.mark.parametrize(
    "n_q,group,kv_lens,splits",
    [(1, 4, None, 3), (1, 1, None, 1), (5, 2, [256, 100], 4), (16, 4, [3, 256], None)],
    ids=["gqa_split3", "mha_nosplit", "verify5_kvlens_split4", "verify16_rows64_auto"],
)
def test_decode_matches_reference(n_q, group, kv_lens, splits):
    b, h_kv, n_k, d = 2, 2, 256, 64
    q, k, v = make_qkv(b, h_kv * group, h_kv, n_q, n_k, d, torch.float16, seed=7)
    lens = None if kv_lens is None else torch.tensor(kv_lens, device=DEV)
    with torch.no_grad():
        out = flash_decode(q, k, v, kv_lens=lens, num_splits=splits)
    ref = attention_reference(q.detach().double(), k.detach().double(), v.detach().double(),
                              causal=True, kv_lens=lens)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= TOL[torch.float16]
    if kv_lens is not None and min(kv_lens) < n_q:  # batch 0 has 3 keys: its first 13 rows see none
        blind = n_q - min(kv_lens)
        assert torch.equal(out[0, :, :blind], torch.zeros_like(out[0, :, :blind]))


def test_decode_kv_lens_past_the_cache_are_clamped():
    q, k, v = make_qkv(2, 2, 2, 2, 96, 32, torch.float32, seed=10)
    lens = torch.tensor([500, 40], device=DEV)
    with torch.no_grad():
        out = flash_decode(q, k, v, kv_lens=lens, num_splits=2)
    ref = attention_reference(q.detach().double(), k.detach().double(), v.detach().double(), causal=True,
                              kv_lens=torch.tensor([96, 40]))
    assert rel_err(out, ref) <= TOL[torch.float32]


def test_cpu_without_interpreter_dispatches_to_the_reference():
    code = ("import torch; from srl.kernels.flash_attention import flash_attention, attention_reference;"
            "q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16);"
            "assert torch.equal(flash_attention(q, k, v, causal=True), attention_reference(q, k, v, causal=True));"
            "import srl.kernels._flash_common as c; assert not c.INTERPRET")
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_decode_bf16_upcast_and_long_split():
    q, k, v = make_qkv(1, 4, 1, 3, 250, 128, torch.bfloat16, seed=8)
    with torch.no_grad():
        out = flash_decode(q, k, v, num_splits=5)
    ref = attention_reference(q.detach().double(), k.detach().double(), v.detach().double(), causal=True)
    assert rel_err(out, ref) <= TOL[torch.bfloat16]


def test_decode_many_splits_ragged_lens_twice_in_a_row():
    # many splits merged by the combine kernel; a second call must give the same answer
    q, k, v = make_qkv(3, 4, 1, 5, 256, 32, torch.float16, seed=11)
    lens = torch.tensor([256, 0, 77], device=DEV, dtype=torch.int32)
    ref = attention_reference(q.detach().double(), k.detach().double(), v.detach().double(), causal=True,
                              kv_lens=lens)
    with torch.no_grad():
        first = flash_decode(q, k, v, kv_lens=lens, num_splits=37)
        second = flash_decode(q, k, v, kv_lens=lens, num_splits=37)
    for out in (first, second):
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) <= TOL[torch.float16]
        assert torch.equal(out[1], torch.zeros_like(out[1]))  # kv_lens 0: no key
    assert torch.equal(first, second)


def test_reference_matches_torch_sdpa():
    q, k, v = (t.detach().double() for t in make_qkv(2, 4, 2, 33, 33, 16, torch.float64, device="cpu"))
    k_rep, v_rep = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    for causal in (False, True):
        want = F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=causal)
        assert rel_err(attention_reference(q, k, v, causal=causal), want) < 1e-12


@pytest.mark.parametrize(
    "shapes,dtype,match",
    [
        (((2, 4, 8), (2, 4, 8, 16), (2, 4, 8, 16)), torch.float16, r"q must be 4-D"),
        (((1, 4, 8, 16), (1, 4, 8, 16), (1, 4, 9, 16)), torch.float16, r"same shape"),
        (((1, 4, 8, 16), (1, 3, 8, 16), (1, 3, 8, 16)), torch.float16, r"multiple of k/v heads"),
        (((1, 4, 8, 16), (2, 4, 8, 16), (2, 4, 8, 16)), torch.float16, r"batch size B and head dim D"),
        (((1, 4, 8, 48), (1, 4, 8, 48), (1, 4, 8, 48)), torch.float16, r"head dim D=48"),
        (((1, 4, 8, 16), (1, 4, 8, 16), (1, 4, 8, 16)), torch.int32, r"dtype torch.int32"),
    ],
)
def test_bad_inputs_raise_value_error(shapes, dtype, match):
    q, k, v = (torch.zeros(s, dtype=dtype) for s in shapes)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v)


def test_bad_decode_inputs_raise_value_error():
    q = torch.zeros(1, 2, 65, 32, dtype=torch.float16)
    k = torch.zeros(1, 2, 64, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="at most 64 query rows"):
        flash_decode(q, k, k)
    with pytest.raises(ValueError, match="kv_lens"):
        flash_decode(q[:, :, :1], k, k, kv_lens=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="share a dtype"):
        flash_attention(q, k.float(), k)


# --------------------------------------------------------------------------- GPU
GPU_CASES = [
    # (B, H, H_kv, Nq, Nk, D, causal)
    (2, 8, 8, 1024, 1024, 64, False),
    (2, 8, 8, 1000, 1000, 128, True),
    (1, 8, 2, 333, 1111, 128, True),
    (1, 4, 4, 1111, 333, 64, True),
    (2, 4, 1, 517, 517, 32, False),
    (1, 4, 4, 700, 700, 256, True),
    (4, 16, 16, 2048, 2048, 128, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES, ids=[str(c) for c in GPU_CASES])
def test_gpu_forward_and_gradients(case, dtype):
    b, h, h_kv, n_q, n_k, d, causal = case
    q, k, v = make_qkv(b, h, h_kv, n_q, n_k, d, dtype, device="cuda", seed=n_q + d)
    check_against_reference(q, k, v, causal, 1e-2)


TMA_GPU_CASES = [case for case in GPU_CASES if case[5] != 256]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", TMA_GPU_CASES, ids=[str(c) for c in TMA_GPU_CASES])
def test_gpu_tma_forward_and_gradients(case, dtype, monkeypatch):
    fa = importlib.import_module("srl.kernels.flash_attention")  # the module: srl.kernels.flash_attention is the function

    b, h, h_kv, n_q, n_k, d, causal = case
    monkeypatch.setitem(fa._FWD_TILES, d, dict(fa._FWD_TILES[d], TMA=True))
    q, k, v = make_qkv(b, h, h_kv, n_q, n_k, d, dtype, device="cuda", seed=n_q + d)
    assert fa._tma_descriptors(q, k, v, torch.empty_like(q), 64, 64) is not None
    check_against_reference(q, k, v, causal, 1e-2)


@pytest.mark.gpu
def test_gpu_decode_split_replays_in_a_cuda_graph():
    # the split path keeps its counters and partials in a cached scratch: replays must reuse it
    q, k, v = (t.detach() for t in make_qkv(2, 8, 2, 1, 8192, 128, torch.bfloat16, device="cuda", seed=12))
    lens = torch.tensor([8192, 3001], device="cuda", dtype=torch.int32)
    with torch.no_grad():
        flash_decode(q, k, v, kv_lens=lens, num_splits=16)  # compiles and sizes the scratch
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = flash_decode(q, k, v, kv_lens=lens, num_splits=16)
        for seed in (13, 14):
            gen = torch.Generator(device="cpu").manual_seed(seed)
            q.copy_(torch.randn(q.shape, generator=gen).to(q))
            graph.replay()
            ref = attention_reference(q.double(), k.double(), v.double(), causal=True, kv_lens=lens)
            assert rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("n_q,group,n_k", [(1, 1, 131072), (1, 8, 100000), (7, 4, 65537), (16, 2, 4096)])
def test_gpu_decode_long_cache(n_q, group, n_k):
    b, h_kv, d = 2, 2, 128
    q, k, v = make_qkv(b, h_kv * group, h_kv, n_q, n_k, d, torch.bfloat16, device="cuda", seed=n_k)
    lens = torch.tensor([n_k, n_k // 3 + 1], device="cuda")
    with torch.no_grad():
        out = flash_decode(q, k, v, kv_lens=lens)
        via_entry = flash_attention(q, k, v, causal=True)
    ref = attention_reference(q.detach().double(), k.detach().double(), v.detach().double(),
                              causal=True, kv_lens=lens)
    assert rel_err(out, ref) <= 1e-2
    ref_full = attention_reference(q.detach().double(), k.detach().double(), v.detach().double(), causal=True)
    assert rel_err(via_entry, ref_full) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", [(64, 4, 2, 129, 193, 32, True), (4, 8, 8, 1000, 1000, 128, True),
                                  (2, 4, 4, 300, 700, 64, False)], ids=str)
def test_gpu_kv_start_forward_and_gradients(case, dtype):
    b, h, h_kv, n_q, n_k, d, causal = case
    q, k, v = make_qkv(b, h, h_kv, n_q, n_k, d, dtype, device="cuda", seed=n_q + d)
    start = random_starts(b, n_q, n_k, causal, seed=d).cuda()
    check_against_reference(q, k, v, causal, 1e-2, kv_start=start)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_tree_verification_and_cache_lengths(dtype):
    from srl.generation.decode import tree_layout

    b, h, d, S, k, L = 8, 8, 128, 1024, 4, 7
    lens = torch.randint(20, S - 1 - k * L, (b,))
    q, kk, v = make_qkv(b, h, h, 1 + k * L, S, d, dtype, device="cuda", seed=70)
    _, _, mask = tree_layout(lens, k, L, S)
    kv_lens, starts, prefix = _tree_layout_bounds(lens, k, L)
    with torch.no_grad():
        s = torch.matmul(q.double(), kk.double().transpose(-1, -2)) * d ** -0.5
        want = torch.softmax(s.masked_fill(~mask.cuda()[:, None], float("-inf")), -1) @ v.double()
        got = flash_attention(q, kk, v, causal=True, kv_lens=kv_lens.cuda(), kv_start=starts.cuda(),
                              kv_prefix=prefix.cuda())
        assert rel_err(got, want) <= 1e-2
        got = flash_attention(q[:, :, :5], kk, v, causal=True, kv_lens=lens.cuda() + 5)
        want = attention_reference(q[:, :, :5].double(), kk.double(), v.double(), causal=True, kv_lens=lens + 5)
        assert rel_err(got, want) <= 1e-2

"""Sparse attention (S2 strided, sink+window, block layouts) against the float64 reference.

Without CUDA the Triton kernels run in the interpreter at small shapes (N <= 256, ragged N,
GQA, Nq != Nk, pattern blocks that divide neither N nor the tiles). Tests marked ``gpu`` run
the compiled kernels in bf16.
"""

import os
import subprocess
import sys

import pytest
import torch

_CPU = not torch.cuda.is_available()
# Triton picks interpreted or compiled code when it is imported (see test_flash_attention.py)
_LATE = _CPU and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and "triton" in sys.modules
if _CPU:
    os.environ["TRITON_INTERPRET"] = "1"

import srl.kernels._flash_common as _common  # noqa: E402
from srl.kernels import sparse_attention as exported  # noqa: E402
from srl.kernels._sparse_patterns import layer_patterns, tile_classes, tile_lists  # noqa: E402
from srl.kernels.sparse_attention import (TILE_OVERRIDE, BlockLayout, S2Cache, S2Strided, SinkWindow,  # noqa: E402
                                          SinkWindowCache, dense_mask, sparse_attention,
                                          sparse_attention_reference, sparse_decode)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {torch.float32: 1e-5 if _CPU else 5e-3, torch.float16: 5e-3, torch.bfloat16: 1.5e-2}


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
    assert torch.cuda.is_available() or _common.INTERPRET
    assert exported is sparse_attention


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_qkv(b, h, h_kv, n_q, n_k, d, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(heads, n):
        return torch.randn(b, heads, n, d, generator=gen).to(device=DEV, dtype=dtype).requires_grad_()
    return rand(h, n_q), rand(h_kv, n_k), rand(h_kv, n_k)


def check_against_reference(q, k, v, pattern, tol):
    """Forward and dq, dk, dv of the kernel against the float64 reference."""
    out = sparse_attention(q, k, v, pattern)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=out.device, dtype=out.dtype)
    out.backward(do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sparse_attention_reference(q64, k64, v64, pattern)
    ref.backward(do.double())
    errs = [rel_err(a, b) for a, b in ((out, ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad))]
    assert all(torch.isfinite(t).all() for t in (out, q.grad, k.grad, v.grad))
    assert max(errs) < tol, errs
    return out


def random_layout(heads, n_blocks, density, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(heads, n_blocks, n_blocks, generator=gen) < density


CASES = [  # (pattern, B, H, H_kv, Nq, Nk, D)
    (SinkWindow(sink=8, window=40), 1, 4, 2, 200, 200, 32),
    (S2Strided(block=16, local_blocks=2, stride=4), 1, 4, 4, 200, 200, 32),
    (S2Strided(block=24, local_blocks=1, stride=3), 2, 3, 1, 77, 200, 16),
    (SinkWindow(sink=0, window=33), 1, 2, 1, 50, 150, 32),
    ("layout", 1, 4, 2, 130, 150, 32),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_and_gradients_match_float64(case):
    pattern, b, h, h_kv, n_q, n_k, d = CASES[case]
    if pattern == "layout":
        pattern = BlockLayout(random_layout(h, 14, 0.4, seed=case), block=11)
    q, k, v = make_qkv(b, h, h_kv, n_q, n_k, d, torch.float32, seed=case)
    check_against_reference(q, k, v, pattern, TOL[torch.float32])


def test_half_precision_inputs():
    q, k, v = make_qkv(1, 2, 2, 120, 120, 32, torch.float16, seed=5)
    check_against_reference(q, k, v, S2Strided(block=16, local_blocks=2, stride=2), TOL[torch.float16])


def test_wrong_pattern_fails_the_check():
    """Negative control: the kernel's output is far from the reference of a neighbouring pattern."""
    q, k, v = make_qkv(1, 4, 2, 128, 128, 32, torch.float32, seed=3)
    with torch.no_grad():
        out = sparse_attention(q, k, v, S2Strided(16, 2, 4))
        assert rel_err(out, sparse_attention_reference(q, k, v, S2Strided(16, 2, 4))) < 1e-5
        for other in (S2Strided(16, 3, 4), S2Strided(16, 2, 2), S2Strided(8, 2, 4)):
            assert rel_err(out, sparse_attention_reference(q, k, v, other)) > 1e-2
        sw = sparse_attention(q, k, v, SinkWindow(8, 40))
        assert rel_err(sw, sparse_attention_reference(q, k, v, SinkWindow(8, 41))) > 1e-4


@pytest.mark.parametrize("variant", [dict(TMA=True), dict(RUNS=True), dict(TMA=True, RUNS=True)])
@pytest.mark.parametrize("pattern", [SinkWindow(4, 50), S2Strided(16, 2, 3)])
def test_forward_variants_tma_and_runs(variant, pattern):
    """TMA descriptors for K/V, and full tiles walked as runs of consecutive tiles."""
    q, k, v = make_qkv(1, 3, 1, 100, 160, 32, torch.float32, seed=4)
    TILE_OVERRIDE["fwd"] = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, **variant)
    try:
        with torch.no_grad():
            out = sparse_attention(q, k, v, pattern)
    finally:
        TILE_OVERRIDE.clear()
    assert rel_err(out, sparse_attention_reference(q, k, v, pattern)) < TOL[torch.float32]


def test_runs_cover_the_full_lists():
    lists = tile_lists(S2Strided(16, 3, 4), 4, 200, 200, 32, 16, "cpu")
    runs, run_len = lists.as_runs()
    for h in range(4):
        for m in range(lists.full_cnt.shape[1]):
            want = lists.full_idx[h, m, :lists.full_cnt[h, m]].tolist()
            got = [s + i for s, n in zip(runs.full_idx[h, m].tolist(), run_len[h, m].tolist())
                   for i in range(n)][:sum(run_len[h, m].tolist())]
            assert got == want and int(runs.full_cnt[h, m]) <= len(want) + (len(want) == 0)


def test_rows_without_visible_keys_are_zero_not_nan():
    h, n, block = 2, 96, 16
    layout = random_layout(h, 6, 0.5, seed=9)
    layout[0, 2] = False  # query rows 32..47 of head 0 see nothing
    layout[1, :, :] = False  # head 1 sees nothing at all
    q, k, v = make_qkv(1, h, h, n, n, 32, torch.float32, seed=9)
    out = check_against_reference(q, k, v, BlockLayout(layout, block), TOL[torch.float32])
    assert (out[0, 0, 32:48] == 0).all() and (out[0, 1] == 0).all()
    assert (q.grad[0, 1] == 0).all() and (k.grad[0, 1] == 0).all() and (v.grad[0, 1] == 0).all()


@pytest.mark.parametrize("n", [64, 200, 256])
def test_s2_heads_together_cover_every_causal_key(n):
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for stride, heads in ((4, 4), (4, 6), (8, 8)):
        union = dense_mask(S2Strided(16, 1, stride), heads, n, n, "cpu").any(0)
        assert torch.equal(union, causal)
    # fewer heads than the stride leave blocks unseen
    assert not torch.equal(dense_mask(S2Strided(16, 1, 4), 3, n, n, "cpu").any(0), causal)


@pytest.mark.parametrize("pattern", [SinkWindow(5, 37), SinkWindow(0, 64), S2Strided(16, 2, 3), S2Strided(24, 1, 4),
                                     "layout"])
@pytest.mark.parametrize("shape", [(200, 200, 32, 32), (77, 200, 64, 32), (130, 150, 16, 64)])
def test_tile_classes_are_exact(pattern, shape):
    """Full tiles are wholly visible and in range; skipped tiles hold no visible key."""
    n_q, n_k, bm, bn = shape
    heads = 3
    if pattern == "layout":
        pattern = BlockLayout(random_layout(heads, 20, 0.3, seed=1), block=11)
    mask = dense_mask(pattern, heads, n_q, n_k, "cpu")  # (hp, Nq, Nk)
    classes = tile_classes(pattern, heads, n_q, n_k, bm, bn, "cpu")
    mt, nt = -(-n_q // bm), -(-n_k // bn)
    padded = torch.zeros(mask.shape[0], mt * bm, nt * bn, dtype=torch.bool)
    valid = torch.zeros_like(padded)
    padded[:, :n_q, :n_k] = mask
    valid[:, :n_q, :n_k] = True
    tiles = padded.view(-1, mt, bm, nt, bn)
    any_ = tiles.any(4).any(2)
    all_ = (tiles | ~valid.view(-1, mt, bm, nt, bn)).all(4).all(2) & valid.view(-1, mt, bm, nt, bn).all(4).all(2)
    assert torch.equal(classes == 2, all_.expand_as(classes))
    assert not (any_ & (classes == 0)).any()


def test_work_is_proportional_to_visible_blocks():
    """At 16k the S2 lists visit close to the visible 64-blocks, far fewer than causal tiles."""
    n, heads = 16384, 16
    pattern = S2Strided(64, 16, 8)
    lists = tile_lists(pattern, heads, n, n, 128, 64, "cpu")
    nb = n // 64
    visible_blocks = int(tile_classes(pattern, heads, n, n, 64, 64, "cpu").gt(0).sum())
    causal_tiles = heads * (n // 128) * (n // 128 + 1) // 2 * 2  # in 128x64 tiles
    assert lists.visited < 0.25 * causal_tiles
    assert lists.visited * 2 < 1.15 * visible_blocks  # a 128x64 tile covers two 64x64 blocks
    assert visible_blocks < 0.25 * heads * nb * (nb + 1) // 2  # 23% at 16k (13% at 128k)


def _fill(cache, k, v, steps):
    """Append the first positions, then ``steps`` chunks; yield the length after each chunk."""
    t = 150
    cache.append(k[:, :, :t], v[:, :, :t])
    for step in steps:
        cache.append(k[:, :, t:t + step], v[:, :, t:t + step])
        t += step
        yield t, step


@pytest.mark.parametrize("kind", ["sink_window", "s2", "s2_gqa"])
def test_decode_with_evicted_cache_equals_full_cache(kind):
    b, h, d, n = 2, 4, 32, 240
    h_kv = 2 if kind == "s2_gqa" else 4
    gen = torch.Generator().manual_seed(11)
    k = torch.randn(b, h_kv, n, d, generator=gen).to(DEV)
    v = torch.randn(b, h_kv, n, d, generator=gen).to(DEV)
    if kind == "sink_window":
        pattern = SinkWindow(8, 40)
        cache = SinkWindowCache(pattern, b, h_kv, d, max_new=4, device=DEV, dtype=torch.float32)
    else:
        pattern = S2Strided(16, 2, 4)
        cache = S2Cache(pattern, b, h_kv, h, d, max_len=n, max_new=4, device=DEV, dtype=torch.float32)
    for i, (t, step) in enumerate(_fill(cache, k, v, [1, 3, 30, 4, 1, 46])):
        nq = min(step, 4)
        q = torch.randn(b, h, nq, d, generator=gen).to(DEV)
        ref = sparse_attention_reference(q.double(), k[:, :, :t].double(), v[:, :, :t].double(), pattern)
        out = sparse_decode(q, cache, num_splits=(1, 3)[i % 2])
        assert rel_err(out, ref) < TOL[torch.float32], (t, nq)
    assert cache.k.shape[2] < n  # the cache holds less than the context
    if kind == "sink_window":
        assert cache.k.shape[2] == 8 + 40 + 3


def test_decode_rejects_too_many_queries():
    cache = SinkWindowCache(SinkWindow(4, 16), 1, 2, 32, max_new=2, device=DEV, dtype=torch.float32)
    cache.append(torch.zeros(1, 2, 20, 32, device=DEV), torch.zeros(1, 2, 20, 32, device=DEV))
    with pytest.raises(ValueError, match="max_new"):
        sparse_decode(torch.zeros(1, 2, 3, 32, device=DEV), cache)


def test_bad_inputs_raise_value_errors():
    q, k, v = make_qkv(1, 2, 2, 64, 32, 32, torch.float32)
    with pytest.raises(ValueError, match="Nq <= Nk"):
        sparse_attention(q, k, v, SinkWindow(4, 8))
    q, k, v = make_qkv(1, 2, 2, 32, 32, 32, torch.float32)
    with pytest.raises(ValueError, match="pattern"):
        sparse_attention(q, k, v, "sink_window")
    with pytest.raises(ValueError, match="layout shape"):
        sparse_attention(q, k, v, BlockLayout(torch.ones(2, 1, 1, dtype=torch.bool), 16))
    with pytest.raises(ValueError, match="window"):
        SinkWindow(4, 0)
    with pytest.raises(ValueError, match="stride"):
        S2Strided(64, 16, 0)


def test_layer_patterns_longgen_hybrid():
    patterns = layer_patterns({"pattern": "s2", "block": 64, "local_blocks": 16, "stride": 8, "hybrid": True}, 6)
    assert patterns[2] is None and patterns[3] is None
    assert all(isinstance(patterns[i], S2Strided) for i in (0, 1, 4, 5))
    assert layer_patterns({}, 3) == [None] * 3
    with pytest.raises(ValueError, match="pattern"):
        layer_patterns({"pattern": "strided"}, 3)


def test_hybrid_lm_trains_and_generates_with_the_pattern():
    """Cached step-by-step logits equal the full sparse forward, which differs from dense."""
    from srl.policies.lm import KVCache, LMConfig, TransformerLM
    torch.manual_seed(0)
    spec = {"pattern": "sink_window", "sink": 2, "window": 5, "hybrid": True}
    cfg = LMConfig(vocab_size=32, d_model=32, n_layers=3, n_heads=2, max_seq_len=64, attention=spec)
    model = TransformerLM(cfg).to(DEV)
    assert [b.pattern is None for b in model.blocks] == [False, True, False]
    tokens = torch.randint(0, 32, (2, 40), device=DEV)
    full = model(tokens)
    cache = KVCache.for_model(cfg, 2, 64, device=DEV)
    t0, s = 17, torch.arange(64, device=DEV)
    slots = torch.arange(t0, device=DEV).expand(2, t0)
    outs = [model(tokens[:, :t0], cache, slots, slots, (s[None, None, :] <= slots[:, :, None]).expand(2, t0, 64))]
    for t in range(t0, 40):
        slot = torch.full((2, 1), t, device=DEV)
        outs.append(model(tokens[:, t:t + 1], cache, slot, slot, (s <= t)[None, None, :].expand(2, 1, 64)))
    assert (torch.cat(outs, 1) - full).abs().max() < 1e-4
    dense = TransformerLM(LMConfig(vocab_size=32, d_model=32, n_layers=3, n_heads=2, max_seq_len=64)).to(DEV)
    dense.load_state_dict(model.state_dict())
    assert (dense(tokens) - full).abs().max() > 1e-3
    loss = torch.nn.functional.cross_entropy(full[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_generation_samples_from_the_sparse_model():
    """PlainSampler's log-probs equal those of a full sparse forward over prompt + completion."""
    from srl.generation.decode import PlainSampler
    from srl.policies.lm import LMConfig, TransformerLM
    torch.manual_seed(1)
    spec = {"pattern": "s2", "block": 4, "local_blocks": 2, "stride": 2, "hybrid": True}
    cfg = LMConfig(vocab_size=32, d_model=32, n_layers=3, n_heads=2, max_seq_len=64, attention=spec)
    model = TransformerLM(cfg).to(DEV).eval()
    prompt = torch.randint(0, 32, (2, 12), device=DEV)
    sampler = PlainSampler(model, batch=2, max_len=64, cuda_graph=False,
                           generator=torch.Generator(device=DEV).manual_seed(0))
    out = sampler.generate(prompt, 20)
    with torch.no_grad():
        seq = torch.cat([prompt, out.tokens], 1)
        logp = model(seq).float().log_softmax(-1)[:, 11:-1].gather(2, out.tokens[..., None])[..., 0]
    assert (logp - out.logp).abs().max() < 1e-4


# --------------------------------------------------------------------------
# GPU: compiled kernels in bf16 at larger shapes
# --------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("pattern", [SinkWindow(64, 512), S2Strided(64, 4, 8), S2Strided(48, 3, 4)])
@pytest.mark.parametrize("shape", [(1, 16, 16, 2048, 2048, 128), (2, 8, 2, 1000, 1333, 64)])
def test_gpu_bf16_against_float64(pattern, shape):
    b, h, h_kv, n_q, n_k, d = shape
    q, k, v = make_qkv(b, h, h_kv, n_q, n_k, d, torch.bfloat16, seed=n_q)
    check_against_reference(q, k, v, pattern, TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=True),
                                   dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, TMA=True),
                                   # the range kernel: sink+window's shipped tile, and two programs an SM
                                   # with 128 rows (8 warps capped at 128 registers, 2 stages)
                                   dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, TMA=True, RANGES=True),
                                   dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, TMA=True, RANGES=True,
                                        maxnreg=128)])
def test_gpu_tma_forward(tiles):
    q, k, v = make_qkv(1, 8, 8, 3000, 3000, 128, torch.bfloat16, seed=2)
    TILE_OVERRIDE["fwd"] = tiles
    try:
        with torch.no_grad():
            out = sparse_attention(q, k, v, SinkWindow(64, 1024))
    finally:
        TILE_OVERRIDE.clear()
    assert rel_err(out, sparse_attention_reference(q, k, v, SinkWindow(64, 1024))) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_decode_long_cache():
    b, h, h_kv, d, n = 1, 16, 4, 128, 20000
    k = torch.randn(b, h_kv, n, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(b, h_kv, n, d, device=DEV, dtype=torch.bfloat16)
    for pattern in (SinkWindow(64, 2048), S2Strided(64, 16, 8)):
        if isinstance(pattern, SinkWindow):
            cache = SinkWindowCache(pattern, b, h_kv, d, max_new=4, device=DEV)
        else:
            cache = S2Cache(pattern, b, h_kv, h, d, max_len=n, max_new=4, device=DEV)
        cache.append(k[:, :, :n - 3], v[:, :, :n - 3])
        cache.append(k[:, :, n - 3:], v[:, :, n - 3:])
        q = torch.randn(b, h, 3, d, device=DEV, dtype=torch.bfloat16)
        ref = sparse_attention_reference(q.double(), k.double(), v.double(), pattern)
        assert rel_err(sparse_decode(q, cache), ref) < TOL[torch.bfloat16]

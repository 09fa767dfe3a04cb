"""The fused verification pass of standard speculative sampling (``fused_decode.FusedChunk``,
``decode_step.rope_attend_rows``): the kernel against a float64 reference, the chunk against the
torch forward, and the whole iteration against the torch path from the same generator. Kernels
run through the Triton interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch

from srl.generation.decode import GenState, cache_for, causal_slot_mask, prefill
from srl.generation.fused_decode import FusedChunk
from srl.generation.sampling import SamplingParams
from srl.kernels.decode_step import rope_attend_rows
from srl.policies.lm import LMConfig, TransformerLM, apply_rotary


def _model(seed: int, **kw) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=70, d_model=24, n_layers=2, n_heads=2, max_seq_len=64)
    cfg.update(kw)
    m = TransformerLM(LMConfig(**cfg)).eval()
    with torch.no_grad():  # larger weights than the init: sharper attention and logits
        for p in m.parameters():
            p.mul_(4.0)
    return m


def _reference_rows(qkv, freqs, lens, kc, vc, H, T, causal=True):
    """float64: rotary at lens + i, cache written, row i attends to slots < lens + i + 1 (without
    ``causal``: to all of the chunk, the control)."""
    B, S, hd = lens.shape[0], kc.shape[2], kc.shape[3]
    x = qkv.double().view(B, T, 3, H, hd)
    pos = lens[:, None] + torch.arange(T)
    f = torch.view_as_complex(freqs.double())[pos][:, :, None, :]  # (B, T, 1, hd/2)
    q, k = apply_rotary(x[:, :, 0], f), apply_rotary(x[:, :, 1], f)
    kc, vc = kc.double().clone(), vc.double().clone()
    for b in range(B):
        kc[b, :, pos[b]] = k[b].transpose(0, 1)
        vc[b, :, pos[b]] = x[b, :, 2].transpose(0, 1)
    sc = torch.einsum("bthd,bhsd->bhts", q, kc) * hd ** -0.5
    last = pos if causal else pos[:, -1:].expand(B, T)
    visible = torch.arange(S)[None, None, :] <= last[:, :, None]  # (B, T, S)
    sc = sc.masked_fill(~visible[:, None], float("-inf"))
    o = torch.einsum("bhts,bhsd->bthd", sc.softmax(-1), vc)
    return o.reshape(B * T, H * hd), kc, vc


@pytest.mark.parametrize("T", [2, 5])
def test_rope_attend_rows_against_float64(T):
    g = torch.Generator().manual_seed(T)
    B, H, hd, S = 2, 2, 8, 40
    lens = torch.tensor([21, 3])  # more than one cache tile on row 0, a short prefix on row 1
    qkv = torch.randn(B * T, 3 * H * hd, generator=g)
    kc, vc = torch.randn(B, H, S, hd, generator=g), torch.randn(B, H, S, hd, generator=g)
    freqs = torch.view_as_real(_model(0, n_heads=2, d_model=2 * hd).rotary.freqs).contiguous()
    want, want_k, want_v = _reference_rows(qkv, freqs, lens, kc, vc, H, T)
    out = torch.zeros(B * T, H * hd)
    rope_attend_rows(qkv, freqs, lens, kc, vc, out, H, T)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc.double(), want_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vc.double(), want_v, rtol=1e-5, atol=1e-5)
    # control: the reference with every row seeing the whole chunk is told apart
    wrong, _, _ = _reference_rows(qkv, freqs, lens, kc, vc, H, T, causal=False)
    assert not torch.allclose(out.double(), wrong, rtol=1e-3, atol=1e-3)


def test_fused_chunk_matches_torch_forward():
    """Logits and cache entries of a chunk of T tokens after a prefix against the torch forward."""
    model = _model(3)
    B, T0, T = 2, 6, 4
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 70, (B, T0), generator=g)
    chunk = torch.randint(0, 70, (B, T), generator=g)
    outs = []
    with torch.inference_mode():
        for fused in (False, True):
            cache = cache_for(model, B, 32, "cpu", torch.float32)
            prefill(model, cache, prompt)
            lens = cache.lens.clone()
            if fused:
                logits = FusedChunk(model, cache, B, T)(chunk, lens)
            else:
                slots, mask = causal_slot_mask(lens, T, cache.max_len)
                logits = model(chunk, cache, positions=slots, slots=slots, mask=mask)
            outs.append((logits, cache))
    (l0, c0), (l1, c1) = outs
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-4)
    n = T0 - 1 + T
    torch.testing.assert_close(c1.k[..., :n, :], c0.k[..., :n, :], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c1.v[..., :n, :], c0.v[..., :n, :], rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        last = FusedChunk(model, c1, B, T)(chunk, lens, head_rows=1)
    torch.testing.assert_close(last, l0[:, -1:], rtol=1e-4, atol=1e-4)


def _iterations(target, draft, prompt, fused: bool, L: int, iters: int, params, draft_steps: bool = True,
                select: bool = False, max_new: int = 20, end_offset: int = 0):
    from srl.generation.speculative import fused_draft_step, fused_standard, speculative_step

    B = prompt.shape[0]
    tc, dc = cache_for(target, B, 48, "cpu", torch.float32), cache_for(draft, B, 48, "cpu", torch.float32)
    state = GenState.allocate(B, 48, "cpu")
    state.reset(prompt, max_new)
    state.end -= torch.arange(B) * end_offset  # rows finishing at different iterations
    step = fused_draft_step(draft, dc, state, params, 1, "cpu", force=True) if fused and draft_steps else None
    fs = fused_standard(target, draft, tc, dc, B, 1, L, "cpu", force=True, params=params if select else None,
                        draft_step=step) if fused else None
    assert (fs is not None) == fused and (fused and fs.work is not None) == select
    gen = torch.Generator().manual_seed(4)
    stats = torch.zeros(3, dtype=torch.long)
    with torch.inference_mode():
        prefill(target, tc, prompt)
        prefill(draft, dc, prompt)
        for _ in range(iters):
            speculative_step(target, draft, tc, dc, state, 1, L, params, gen, stats, draft_step=step, fused=fs)
    return state, tc, dc, stats


@pytest.mark.parametrize("B,draft_steps", [(2, True), (2, False)])
def test_fused_iteration_matches_torch_iteration(B, draft_steps):
    """Standard speculative sampling with the fused re-feed, draft steps (or the torch draft steps)
    and verification emits what the torch path emits from the same generator: tokens, the
    policy's log-probs, caches."""
    target, draft = _model(7), _model(8, d_model=16, n_heads=2, n_layers=1)
    prompt = torch.randint(0, 70, (B, 5), generator=torch.Generator().manual_seed(3))
    params = SamplingParams(1.0)
    s0, t0, d0, st0 = _iterations(target, draft, prompt, False, 3, 3, params)
    s1, t1, d1, st1 = _iterations(target, draft, prompt, True, 3, 3, params, draft_steps)
    assert torch.equal(s1.tokens, s0.tokens) and torch.equal(t1.lens, t0.lens) and torch.equal(st1, st0)
    assert int(st0[1]) > 0  # some drafted tokens were accepted
    torch.testing.assert_close(s1.logp, s0.logp, rtol=1e-4, atol=1e-5)
    n = int(t0.lens.max())
    torch.testing.assert_close(t1.k[..., :n, :], t0.k[..., :n, :], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d1.v[..., :n, :], d0.v[..., :n, :], rtol=1e-5, atol=1e-5)


def test_fused_iteration_negative_control():
    """A target whose layer differs only inside the fused path's view gives different log-probs."""
    from srl.generation import speculative

    target, draft = _model(7), _model(8, d_model=16, n_heads=2, n_layers=1)
    prompt = torch.randint(0, 70, (1, 5), generator=torch.Generator().manual_seed(3))
    params = SamplingParams(1.0)
    s0, *_ = _iterations(target, draft, prompt, False, 3, 2, params)
    with torch.no_grad():
        target.blocks[1].fc_out.weight.mul_(1.3)
    s1, *_ = _iterations(target, draft, prompt, True, 3, 2, params)
    assert not torch.allclose(s1.logp, s0.logp, rtol=1e-4, atol=1e-5)
    assert speculative.fused_standard(target, draft, None, None, 1, 4, 3, "cpu", force=True) is None  # k > 1


@pytest.mark.parametrize("B,temperature,end_offset", [(1, 1.0, 0), (2, 0.7, 4)])
def test_fused_selection_matches_torch_iteration(B, temperature, end_offset):
    """Every part fused (the draft's tokens drawn by the race kernels, the selection and state
    write by ``spec_select.verify_select``) against the torch path from the same generator: the
    same tokens, the policy's log-probs, lengths, statistics and caches; rows reaching their end
    at different iterations."""
    target, draft = _model(7), _model(8, d_model=16, n_heads=2, n_layers=1)
    prompt = torch.randint(0, 70, (B, 5), generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature)
    kw = dict(max_new=10, end_offset=end_offset)
    s0, t0, d0, st0 = _iterations(target, draft, prompt, False, 3, 3, params, **kw)
    s1, t1, d1, st1 = _iterations(target, draft, prompt, True, 3, 3, params, select=True, **kw)
    assert torch.equal(s1.tokens, s0.tokens) and torch.equal(t1.lens, t0.lens) and torch.equal(st1, st0)
    assert torch.equal(d1.lens, d0.lens) and int(st0[1]) > 0
    torch.testing.assert_close(s1.logp, s0.logp, rtol=1e-4, atol=1e-5)
    n = int(t0.lens.max())
    torch.testing.assert_close(t1.k[..., :n, :], t0.k[..., :n, :], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d1.k[..., :n, :], d0.k[..., :n, :], rtol=1e-5, atol=1e-5)
    if end_offset:
        assert int(t0.lens[1]) < int(t0.lens[0])  # row 1 stopped at its end


def test_fused_selection_negative_control(monkeypatch):
    """Control: the selection run at another temperature than the draws (p / q and the recorded
    log-probs then belong to other distributions) is told apart from the torch path."""
    from srl.kernels import spec_select

    target, draft = _model(7), _model(8, d_model=16, n_heads=2, n_layers=1)
    prompt = torch.randint(0, 70, (1, 5), generator=torch.Generator().manual_seed(3))
    params = SamplingParams(1.0)
    s0, *_ = _iterations(target, draft, prompt, False, 3, 3, params)
    real = spec_select.verify_select
    monkeypatch.setattr(spec_select, "verify_select",
                        lambda *a, **kw: real(*a[:6], 0.5, *a[7:], **kw))
    s1, *_ = _iterations(target, draft, prompt, True, 3, 3, params, select=True)
    assert not torch.allclose(s1.logp, s0.logp, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_fused_iteration_joint_law_in_cuda_graph(monkeypatch):
    """On the GPU, every part fused (batch 8, one CUDA graph per iteration): the joint law of 3
    tokens against the exact law of a tiny float32 transformer, and the recorded log-probs are the
    target's."""
    import copy

    pytest.importorskip("scipy")
    from test_speculative import PASS, chi2_pvalue, exact_lm_joint, joint_index

    from srl.generation import fused_decode, speculative
    from srl.generation.speculative import SpeculativeSampler

    monkeypatch.setattr(speculative, "FUSED_VERIFY", 8)
    monkeypatch.setattr(fused_decode, "FUSED_GEMV", 8)
    torch.manual_seed(5)
    cfg = dict(vocab_size=5, max_seq_len=64, init_std=0.6)
    target = TransformerLM(LMConfig(d_model=32, n_layers=2, n_heads=2, **cfg)).eval()
    draft = TransformerLM(LMConfig(d_model=32, n_layers=1, n_heads=2, **cfg)).eval()
    params, prompt = SamplingParams(0.7), (1, 3, 0)
    exact = exact_lm_joint(copy.deepcopy(target).double(), prompt, 3, params, 5)
    s = SpeculativeSampler(target.cuda(), draft.cuda(), 8, 32, k=1, draft_len=2, params=params)
    assert s.fused is not None and s.fused.work is not None and s.draft_step is not None
    rows = torch.tensor(prompt, device="cuda").expand(8, 3).contiguous()
    outs = [s.generate(rows, 3) for _ in range(750)]
    tokens = torch.cat([o.tokens.cpu() for o in outs])
    logp = torch.cat([o.logp.cpu() for o in outs])
    idx = joint_index(tokens, 5)
    assert chi2_pvalue(idx, exact) > PASS
    assert torch.allclose(logp.sum(1).double(), exact[idx].log(), atol=1e-3)

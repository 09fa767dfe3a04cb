"""The fused decode step (srl.generation.fused_decode, srl.kernels.decode_step) computes what the
torch decode step computes: the same tokens from the same generator, the same log-probabilities,
the same cache entries. Kernels run through the Triton interpreter on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from srl.generation.decode import GenState, PlainSampler, cache_for, decode_one_token, prefill
from srl.generation.fused_decode import FusedDecodeStep, fused_unsupported
from srl.generation.sampling import SamplingParams
from srl.policies.lm import LMConfig, TransformerLM


def _model(seed: int, dtype=torch.float32, **kw) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=70, d_model=24, n_layers=2, n_heads=2, max_seq_len=64)
    cfg.update(kw)
    m = TransformerLM(LMConfig(**cfg)).to(dtype).eval()
    with torch.no_grad():  # larger weights than the init: sharper attention and logits
        for p in m.parameters():
            p.mul_(4.0)
    return m


def _run(model, prompt, params, steps, fused, seed, end_offset=0):
    B, T0 = prompt.shape
    cache = cache_for(model, B, 40, "cpu", next(model.parameters()).dtype)
    state = GenState.allocate(B, 40, "cpu")
    state.reset(prompt, steps)
    state.end -= torch.arange(B) * end_offset  # rows finishing at different steps
    gen = torch.Generator().manual_seed(seed)
    step = FusedDecodeStep(model, cache, state, params) if fused else None
    with torch.inference_mode():
        prefill(model, cache, prompt)
        for _ in range(steps):
            if fused:
                step(gen)
            else:
                decode_one_token(model, cache, state, params, gen)
    return state, cache


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7), SamplingParams(0.0),
                                    SamplingParams(1.0, top_k=5)])
def test_fused_step_matches_torch_step(params):
    model = _model(0)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 70, (3, 5), generator=g)
    steps = 9
    ref, ref_cache = _run(model, prompt, params, steps, False, seed=7, end_offset=3)
    out, cache = _run(model, prompt, params, steps, True, seed=7, end_offset=3)
    assert torch.equal(out.tokens, ref.tokens)
    torch.testing.assert_close(out.logp, ref.logp, rtol=1e-4, atol=1e-5)
    assert torch.equal(cache.lens, ref_cache.lens)
    assert ref_cache.lens.tolist() == [4 + steps, 4 + steps - 3, 4 + steps - 6]  # rows stopped at end
    n = int(ref_cache.lens.max())
    torch.testing.assert_close(cache.k[..., :n, :], ref_cache.k[..., :n, :], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.v[..., :n, :], ref_cache.v[..., :n, :], rtol=1e-5, atol=1e-5)
    assert (out.logp[:, 5:] < 0).any() or params.temperature == 0


def test_fused_step_negative_control():
    """A model whose second layer differs gives different log-probs: the comparison can fail."""
    model = _model(0)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.blocks[1].proj.weight.mul_(1.5)
    prompt = torch.randint(0, 70, (2, 5), generator=torch.Generator().manual_seed(1))
    ref, _ = _run(model, prompt, SamplingParams(1.0), 4, False, seed=3)
    out, _ = _run(other, prompt, SamplingParams(1.0), 4, True, seed=3)
    assert not torch.allclose(out.logp, ref.logp, rtol=1e-4, atol=1e-5)


def test_fused_step_bf16_close_to_float64_model():
    """bf16 model through the kernels: the log-probs of the drawn tokens against the float64 model."""
    model = _model(2)
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    prompt = torch.randint(0, 70, (2, 4), generator=torch.Generator().manual_seed(5))
    out, _ = _run(m16, prompt, SamplingParams(1.0), 6, True, seed=11)
    seq = out.tokens[:, :4 + 6]
    with torch.no_grad():
        logits = model.double()(seq[:, :-1])
    ref = torch.log_softmax(logits, -1).gather(-1, seq[:, 1:, None])[..., 0][:, 3:]
    got = out.logp[:, 4:4 + 6].double()
    assert (got - ref).abs().max() < 0.15, (got, ref)


def test_fused_step_with_cats_matches_torch_step():
    from srl.generation.cats_calibration import apply_cats, calibrate_cats

    model = _model(3, mlp={"type": "swiglu", "hidden": 40})
    calib = [torch.randint(0, 70, (4, 16), generator=torch.Generator().manual_seed(0))]
    apply_cats(model, calibrate_cats(model, calib, 0.5))
    prompt = torch.randint(0, 70, (2, 5), generator=torch.Generator().manual_seed(4))
    ref, ref_cache = _run(model, prompt, SamplingParams(1.0), 6, False, seed=9)
    out, cache = _run(model, prompt, SamplingParams(1.0), 6, True, seed=9)
    assert torch.equal(out.tokens, ref.tokens)
    torch.testing.assert_close(out.logp, ref.logp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache.k, ref_cache.k, rtol=1e-5, atol=1e-5)


def test_unsupported_models_fall_back():
    params = SamplingParams()
    assert fused_unsupported(_model(0), params) is None
    assert "ladder" in fused_unsupported(_model(0, residual="ladder"), params)
    sparse = _model(0, attention={"pattern": "sink_window", "sink": 2, "window": 8})
    assert fused_unsupported(sparse, params) is not None
    with pytest.raises(ValueError, match="fused decode step"):
        s = PlainSampler(sparse, 1, 32, params, cuda_graph=False, fused=True)
        s.close()


def test_plain_sampler_fused_matches_unfused():
    model = _model(1)
    prompt = torch.randint(0, 70, (2, 4), generator=torch.Generator().manual_seed(2))
    outs = []
    for fused in (False, True):
        s = PlainSampler(model, 2, 32, SamplingParams(1.0), cuda_graph=False, fused=fused,
                         generator=torch.Generator().manual_seed(5))
        outs.append(s.generate(prompt, 8))
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    torch.testing.assert_close(outs[0].logp, outs[1].logp, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 5])
def test_fused_step_on_cuda_in_a_graph(batch):
    """On the device, in a CUDA graph: float32 model, the fused sampler draws what the torch one
    draws from the same generator seed, with the same log-probabilities."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = TransformerLM(LMConfig(vocab_size=3000, d_model=128, n_layers=3, n_heads=2,
                                       max_seq_len=256)).eval()
    prompt = torch.randint(0, 3000, (batch, 7), device="cuda")
    outs = []
    for fused in (False, True):
        s = PlainSampler(model, batch, 96, SamplingParams(1.0), fused=fused,
                         generator=torch.Generator(device="cuda").manual_seed(4))
        outs.append(s.generate(prompt, 40))
        s.close()
    same = (outs[0].tokens == outs[1].tokens).float().mean()
    assert same > 0.95, same
    first = outs[0].tokens[:, :8] == outs[1].tokens[:, :8]
    assert first.all()
    torch.testing.assert_close(outs[0].logp[:, :8], outs[1].logp[:, :8], rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- small-batch fused matmuls

def _ln(x, w, eps=1e-5):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, None, eps)


def test_gemv_norm_and_split_against_float64():
    """gemv_split partials sum to x @ W^T; gemv_norm = LayerNorm(x + partials) @ W^T (and GELU),
    with x_new stored; the embedding prologue; all against float64."""
    from srl.kernels.decode_gemv import gemv_norm, gemv_split, split_count

    g = torch.Generator().manual_seed(0)
    B, D, H, N = 3, 24, 72, 40
    x, a = torch.randn(B, D, generator=g), torch.randn(B, H, generator=g)
    w_out, w_in = torch.randn(D, H, generator=g) / 8, torch.randn(N, D, generator=g)
    lnw = torch.rand(D, generator=g) + 0.5
    part = torch.empty(split_count(H), B, D)
    assert part.shape[0] > 1  # several K chunks at the interpreter's tiles
    gemv_split(a, w_out, part)
    y = a.double() @ w_out.double().T
    torch.testing.assert_close(part.sum(0).double(), y, rtol=1e-5, atol=1e-5)
    x_new, out = torch.zeros(B, D), torch.zeros(B, N)
    gemv_norm(w_in, lnw, 1e-5, x_new, out, x_in=x, part=part, gelu=True)
    ref_x = x.double() + y
    torch.testing.assert_close(x_new.double(), ref_x, rtol=1e-5, atol=1e-5)
    ref = torch.nn.functional.gelu(_ln(ref_x, lnw.double()) @ w_in.double().T, approximate="tanh")
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    gemv_norm(w_in * 1.01, lnw, 1e-5, x_new, out, x_in=x, part=part, gelu=True)
    assert not torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-4)  # negative control
    emb, tokens, lens = torch.randn(50, D, generator=g), torch.randint(0, 50, (B, 7), generator=g), torch.tensor([0, 3, 6])
    gemv_norm(w_in, lnw, 1e-5, x_new, out, tokens=tokens, lens=lens, embedding=emb)
    ref_x = emb[tokens[torch.arange(B), lens]].double()
    torch.testing.assert_close(x_new.double(), ref_x)
    torch.testing.assert_close(out.double(), _ln(ref_x, lnw.double()) @ w_in.double().T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="x_in"):
        gemv_norm(w_in, lnw, 1e-5, x, out, x_in=x, part=part)


def test_attend_proj_matches_rope_attend_then_projection():
    from srl.kernels.decode_gemv import attend_proj
    from srl.kernels.decode_step import rope_attend

    g = torch.Generator().manual_seed(1)
    B, H, HD, S = 2, 3, 8, 12
    D = H * HD
    qkv = torch.randn(B, 3 * D, generator=g)
    freqs = torch.view_as_real(torch.polar(torch.ones(S, HD // 2), torch.rand(S, HD // 2, generator=g) * 6)).contiguous()
    lens = torch.tensor([5, 11])
    kc, vc = torch.randn(B, H, S, HD, generator=g), torch.randn(B, H, S, HD, generator=g)
    w = torch.randn(D, D, generator=g)
    k1, v1, attn = kc.clone(), vc.clone(), torch.zeros(B, D)
    rope_attend(qkv, freqs, lens, k1, v1, attn, H)
    part = torch.zeros(H, B, D)
    attend_proj(qkv, freqs, lens, kc, vc, w, part, H)
    torch.testing.assert_close(kc, k1)
    torch.testing.assert_close(vc, v1)
    torch.testing.assert_close(part.sum(0).double(), attn.double() @ w.double().T, rtol=1e-4, atol=1e-4)


def test_head_sample_against_sample_write():
    """The head with the final norm and the sampling race fused draws what the unfused head +
    ``sample_write`` draws from the same noise (several vocabulary chunks and sub-tiles)."""
    from srl.kernels.decode_gemv import head_chunks, head_sample
    from srl.kernels.decode_step import sample_write

    g = torch.Generator().manual_seed(2)
    B, D, V = 3, 24, 70
    assert head_chunks(V) > 2
    x, part = torch.randn(B, D, generator=g), torch.randn(2, B, D, generator=g)
    lnw, w = torch.rand(D, generator=g) + 0.5, torch.randn(V, D, generator=g)
    h = _ln(x.double() + part.double().sum(0), lnw.double()).float()
    for temp in (1.0, 0.5, 0.0):
        for trial in range(3):
            noise = torch.empty(B, V).exponential_(1.0, generator=g)
            refs, outs = [], []
            for fused in (False, True):
                tokens, logp = torch.zeros(B, 10, dtype=torch.long), torch.zeros(B, 10)
                lens, end = torch.tensor([2, 4, 8]), torch.tensor([10, 10, 9])
                logits = torch.zeros(B, V)
                if fused:
                    head_sample(x, part, lnw, 1e-5, w, logits, noise, torch.zeros(B, head_chunks(V), 4),
                                temp, tokens, logp, lens, end)
                else:
                    logits = (h @ w.T).float()
                    sample_write(logits, noise, tokens, logp, lens, end, temp)
                (outs if fused else refs).append((tokens, logp, lens, logits))
            (t0, l0, n0, z0), (t1, l1, n1, z1) = refs[0], outs[0]
            torch.testing.assert_close(z1, z0, rtol=1e-4, atol=1e-4)
            assert torch.equal(t1, t0) and torch.equal(n1, n0) and n1.tolist() == [3, 5, 8]
            torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-5)


def test_norm_rows_against_float64():
    from srl.kernels.decode_gemv import norm_rows

    g = torch.Generator().manual_seed(2)
    x, part, lnw = torch.randn(3, 24, generator=g), torch.randn(4, 3, 24, generator=g), torch.rand(24, generator=g)
    h = torch.zeros(3, 24)
    norm_rows(x, part, lnw, 1e-5, h)
    torch.testing.assert_close(h.double(), _ln(x.double() + part.double().sum(0), lnw.double()),
                               rtol=1e-5, atol=1e-5)
    norm_rows(x, part[:3], lnw, 1e-5, h)  # negative control: one partial fewer
    assert not torch.allclose(h.double(), _ln(x.double() + part.double().sum(0), lnw.double()), atol=1e-3)


def test_gemv_path_matches_torch_step_and_falls_back(monkeypatch):
    """The small-batch path (attention + projection fused, and not; Triton or cuBLAS head) against
    the torch step; the cuBLAS fused step runs where the path does not apply (batch above
    FUSED_GEMV or MAX_ROWS)."""
    from srl.generation import fused_decode
    from srl.kernels import decode_gemv

    model = _model(6)
    prompt = torch.randint(0, 70, (2, 5), generator=torch.Generator().manual_seed(6))
    ref, ref_cache = _run(model, prompt, SamplingParams(0.8), 5, False, seed=2)
    for attend, cublas_head in ((True, False), (False, True)):
        monkeypatch.setattr(fused_decode, "ATTEND_PROJ", attend)
        monkeypatch.setattr(fused_decode, "CUBLAS_HEAD", cublas_head)
        monkeypatch.setattr(fused_decode, "FUSED_GEMV", 2)
        out, cache = _run(model, prompt, SamplingParams(0.8), 5, True, seed=2)
        assert torch.equal(out.tokens, ref.tokens)
        torch.testing.assert_close(out.logp, ref.logp, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache.k, ref_cache.k, rtol=1e-5, atol=1e-5)
    for B, limit, used in ((3, 2, False), (2, 2, True), (decode_gemv.MAX_ROWS + 1, 64, False)):
        monkeypatch.setattr(fused_decode, "FUSED_GEMV", limit)
        state = GenState.allocate(B, 16, "cpu")
        step = FusedDecodeStep(model, cache_for(model, B, 16, "cpu", torch.float32), state, SamplingParams())
        assert step.gemv_path is used


def test_fused_draft_steps_match_the_torch_draft():
    """Standard speculative sampling with the draft's steps through ``FusedDecodeStep.logits``
    emits what the torch draft path emits from the same generator (tokens, log-probs, caches)."""
    from srl.generation.decode import prefill
    from srl.generation.speculative import fused_draft_step, speculative_step

    target, draft = _model(7), _model(8, d_model=16, n_heads=2, n_layers=1)
    prompt = torch.randint(0, 70, (2, 5), generator=torch.Generator().manual_seed(3))
    outs = []
    for fused in (False, True):
        tc, dc = cache_for(target, 2, 40, "cpu", torch.float32), cache_for(draft, 2, 40, "cpu", torch.float32)
        state = GenState.allocate(2, 40, "cpu")
        state.reset(prompt, 12)
        step = fused_draft_step(draft, dc, state, SamplingParams(1.0), 1, "cpu", force=True) if fused else None
        assert (step is not None) == fused
        gen = torch.Generator().manual_seed(4)
        with torch.inference_mode():
            prefill(target, tc, prompt)
            prefill(draft, dc, prompt)
            for _ in range(3):
                speculative_step(target, draft, tc, dc, state, 1, 3, SamplingParams(1.0), gen, draft_step=step)
        outs.append((state, tc, dc))
    (s0, t0, d0), (s1, t1, d1) = outs
    assert torch.equal(s1.tokens, s0.tokens) and torch.equal(t1.lens, t0.lens)
    assert int(t0.lens.min()) > 4 + 3  # more than one token per iteration on some row
    torch.testing.assert_close(s1.logp, s0.logp, rtol=1e-4, atol=1e-5)
    n = int(d0.lens.max())
    torch.testing.assert_close(d1.k[..., :n, :], d0.k[..., :n, :], rtol=1e-5, atol=1e-5)
    assert fused_draft_step(draft, d0, s0, SamplingParams(1.0), 4, "cpu", force=True) is None  # k > 1


@pytest.mark.parametrize("params", [SamplingParams(0.0), SamplingParams(1.0, top_k=5)])
def test_batch_one_default_path_matches_torch_step(params):
    """Batch 1 takes the small-batch path by default: greedy and top-k against the torch step."""
    model = _model(9)
    prompt = torch.randint(0, 70, (1, 4), generator=torch.Generator().manual_seed(8))
    state = GenState.allocate(1, 16, "cpu")
    assert FusedDecodeStep(model, cache_for(model, 1, 16, "cpu", torch.float32), state, params).gemv_path
    ref, _ = _run(model, prompt, params, 5, False, seed=4)
    out, _ = _run(model, prompt, params, 5, True, seed=4)
    assert torch.equal(out.tokens, ref.tokens)
    torch.testing.assert_close(out.logp, ref.logp, rtol=1e-4, atol=1e-5)

"""Speculative sampling is exact: statistical tests, seeded, with negative controls that must fail.

Token level: kseq_select's emitted marginal equals p (per-position chi-square) for k in {1, 2, 4, 8}
on Dirichlet p and q with zeros, p = q, disjoint supports, peaked p and top-k/top-p truncated
pairs; acceptance matches 1 - (1 - beta)^k. Block level: mean tokens per standard block match
(1 - a^(gamma + 1)) / (1 - a). Loop level: the joint law of 3 generated tokens through the full
batched loop (bigram toy models and tiny transformers with KV caches) equals the target's, and
the recorded log-probabilities are the target's. Controls (naive residual with k > 1, rho = 1
with k > 1, draft log-probs recorded as the policy's) fail the same checks.
"""

from types import SimpleNamespace

import pytest
import torch
from scipy import stats
from torch import nn

import srl.generation.speculative as spec
from srl.generation.sampling import SamplingParams, logits_to_probs, sample_from_probs
from srl.generation.speculative import (SpeculativeSampler, kseq_accept, kseq_beta, kseq_rho,
                                        kseq_select, kseq_verify_block, speculative_verify_block)
from srl.policies.lm import LMConfig, TransformerLM

V = 8
N = 30_000
PASS = 1e-3  # a correct sampler's p-value stays above this (fixed seeds)
FAIL = 1e-6  # a broken one's falls below this
ROWS = 12_000  # sequences per full-loop run


def chi2_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of integer samples to probs; cells with expected count < 5 are pooled."""
    n = samples.numel()
    obs = torch.bincount(samples.flatten(), minlength=probs.numel()).double()
    exp = probs.double().flatten() * n
    if (obs[exp == 0] > 0).any():
        return 0.0  # a sample where the target has no mass
    small = exp < 5
    o = torch.cat([obs[~small], obs[small].sum().reshape(1)])
    e = torch.cat([exp[~small], exp[small].sum().reshape(1)])
    keep = e > 0
    return float(stats.chisquare(o[keep].numpy(), e[keep].numpy() * o.sum().item() / e[keep].sum().item()).pvalue)


def _cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    dir_ = torch.distributions.Dirichlet(torch.full((V,), 0.7))
    torch.manual_seed(1)
    p, q = dir_.sample().double(), dir_.sample().double()
    p[[0, 3]] = 0
    q[[3, 5]] = 0  # a shared zero, and zeros on either side only
    p, q = p / p.sum(), q / q.sum()
    peaked = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) / 0.15, -1)
    lp, lq = torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64)
    return {
        "dirichlet_zeros": (p, q),
        "equal": (p, p.clone()),
        "disjoint": (torch.tensor([0.4, 0.3, 0.2, 0.1, 0, 0, 0, 0], dtype=torch.float64),
                     torch.tensor([0, 0, 0, 0, 0.1, 0.2, 0.3, 0.4], dtype=torch.float64)),
        "peaked": (peaked, q),
        "truncated": (logits_to_probs(lp, 0.8, top_k=5), logits_to_probs(lq, 1.3, top_p=0.8)),
    }


CASES = _cases()


def _draw(p, q, k, seed):
    g = torch.Generator().manual_seed(seed)
    P, Q = p.expand(N, V).contiguous(), q.expand(N, V).contiguous()
    drafts = sample_from_probs(Q[:, None].expand(N, k, V), g)
    return P, Q, drafts, g


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_kseq_select_emits_target_distribution(case, k):
    p, q = CASES[case]
    P, Q, drafts, g = _draw(p, q, k, seed=10 * k + len(case))
    tokens, accepted = kseq_select(P, Q, drafts, g)
    assert chi2_pvalue(tokens, p) > PASS
    # accepted index points at a draft carrying the emitted token
    hit = accepted >= 0
    assert torch.equal(drafts[hit].gather(1, accepted[hit, None]).squeeze(1), tokens[hit])
    # acceptance rate matches 1 - (1 - beta(rho*))^k
    rho = kseq_rho(p[None], q[None], k, rounds=10)
    beta = kseq_beta(p[None], q[None], rho)
    theory = float(1 - (1 - beta) ** k)
    sd = (theory * (1 - theory) / N) ** 0.5
    assert abs(hit.double().mean().item() - theory) < 5 * sd + 2e-3


def test_rho_star_properties():
    p, q = CASES["dirichlet_zeros"]
    assert kseq_rho(p[None], q[None], 1).item() == 1.0
    prev = 1.0
    for k in (2, 4, 8):
        rho = kseq_rho(p[None], q[None], k, rounds=10)
        beta = kseq_beta(p[None], q[None], rho)
        assert 1.0 < rho.item() <= k and rho.item() >= prev
        # rho* sits where validity holds with equality: P(accept) = rho* beta
        assert torch.allclose(1 - (1 - beta) ** k, rho * beta, atol=1e-6)
        prev = rho.item()
    # p = q: every first draft is accepted, rho* = 1 for any k
    assert kseq_rho(p[None], p[None], 8, rounds=10).item() == pytest.approx(1.0, abs=1e-6)


def _naive_residual_select(P, Q, drafts, g, rho):
    """Control: k drafts tested against min(1, p/(rho q)), then the k = 1 residual norm(max(0, p - q))."""
    valid = torch.ones_like(drafts, dtype=torch.bool)
    acc = kseq_accept(P, Q, drafts, torch.full((P.shape[0],), rho, dtype=P.dtype), valid, g)
    res = (P - Q).clamp_min(0)
    res = torch.where(res.sum(-1, keepdim=True) > 0, res / res.sum(-1, keepdim=True), P)
    fb = sample_from_probs(res, g)
    return torch.where(acc >= 0, drafts.gather(1, acc.clamp_min(0)[:, None]).squeeze(1), fb)


@pytest.mark.parametrize("case", ["dirichlet_zeros", "peaked", "truncated"])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_negative_controls_fail(case, k):
    p, q = CASES[case]
    P, Q, drafts, g = _draw(p, q, k, seed=100 + k)
    # naive residual norm(max(0, p - q)) with k > 1 (with rho = 1 and with rho*)
    assert chi2_pvalue(_naive_residual_select(P, Q, drafts, g, 1.0), p) < FAIL
    # rho = 1 with k > 1 (K-SEQ residual formula, but rho not rho*)
    tokens, _ = kseq_select(P, Q, drafts, g, rho=1.0)
    assert chi2_pvalue(tokens, p) < FAIL


def test_standard_block_mean_tokens_match_theory():
    p, q = CASES["dirichlet_zeros"]
    alpha = torch.minimum(p, q).sum().item()
    g = torch.Generator().manual_seed(3)
    for gamma in (1, 4):
        Pb = p.expand(N, gamma + 1, V)
        Qb = q.expand(N, gamma, V)
        drafts = sample_from_probs(Qb, g)
        theory = (1 - alpha ** (gamma + 1)) / (1 - alpha)
        emitted, n_emit = speculative_verify_block(Pb, Qb, drafts, g)
        sd = n_emit.double().std().item() / N ** 0.5
        assert abs(n_emit.double().mean().item() - theory) < 5 * sd
        # the block loop with k = 1 is the same law
        _, n_loop, _ = kseq_verify_block(Pb[:, None], Qb[:, None], drafts[:, None], g)
        assert abs(n_loop.double().mean().item() - theory) < 5 * sd
        # every emitted position is distributed as p (context-free p and q)
        for t in range(gamma + 1):
            sel = n_emit > t
            assert chi2_pvalue(emitted[sel, t], p) > PASS


# --------------------------------------------------------------------------- selection kernel
# ``srl.kernels.kseq`` runs each K-SEQ position as one Triton program per row; here through the
# interpreter, which re-patches triton.language on every nested device-function call (about 7
# rows per second on triton 3.9), so these check the laws on few rows. The CUDA-graph joint-law
# tests below run the compiled kernel over 50k sequences.
NK = 120


@pytest.mark.parametrize("case,k", [("dirichlet_zeros", 4), ("disjoint", 4), ("truncated", 3)])
def test_kernel_select_emits_target_distribution(case, k):
    p, q = CASES[case]
    g = torch.Generator().manual_seed(7 * k + len(case))
    P, Q = p.float().expand(NK, V).contiguous(), q.float().expand(NK, V).contiguous()
    drafts = sample_from_probs(Q[:, None].expand(NK, k, V), g)
    tokens, accepted = kseq_select(P, Q, drafts, g, use_kernel=True)
    assert chi2_pvalue(tokens, p) > PASS
    hit = accepted >= 0
    assert torch.equal(drafts[hit].gather(1, accepted[hit, None]).squeeze(1), tokens[hit])
    rho = kseq_rho(p[None], q[None], k, rounds=10)
    theory = float(1 - (1 - kseq_beta(p[None], q[None], rho)) ** k)
    sd = (theory * (1 - theory) / NK) ** 0.5
    assert abs(hit.double().mean().item() - theory) < 5 * sd + 5e-3


@pytest.fixture
def small_chunks(monkeypatch):
    """Vocabulary chunks of 16 entries, so the kernels' cross-chunk sums and race are exercised."""
    import srl.kernels.kseq as kseq
    monkeypatch.setattr(kseq, "_CHUNK", 16)


def test_kernel_rho_matches_torch_grid_search(small_chunks):
    from srl.kernels.kseq import kseq_step
    g = torch.Generator().manual_seed(5)
    B, k, Vr = 24, 8, 37
    p = torch.softmax(2 * torch.randn(B, k, 2, Vr, generator=g), -1)
    q = torch.softmax(2 * torch.randn(B, k, 1, Vr, generator=g), -1)
    drafts = torch.randint(0, Vr, (B, k, 1), generator=g)
    surv = (torch.rand(B, k, generator=g) < 0.6).to(torch.int8)
    surv[:, 3] = 1  # at least one survivor per row; k' from 1 to 8
    rho = torch.empty(B)
    kseq_step(p, q, drafts, 0, surv.clone(), torch.ones(B, dtype=torch.int8),
              torch.zeros(B, dtype=torch.long), torch.zeros(B, 2, dtype=torch.long),
              torch.tensor([1]), rho_out=rho)
    first = surv.int().argmax(-1)
    rows = torch.arange(B)
    want = kseq_rho(p[rows, first, 0], q[rows, first, 0], surv.sum(-1), grid=16, rounds=2)
    assert torch.allclose(rho, want, rtol=1e-5)
    assert (rho[surv.sum(-1) == 1] == 1).all()
    assert (rho[surv.sum(-1) > 1] > 1).all()


@pytest.mark.parametrize("k,L", [(3, 1)])
def test_kernel_block_positions_follow_target(k, L, small_chunks):
    """Context-free p and q: each emitted position of a block is distributed as p (V = 40 in
    chunks of 16, so the residual race crosses chunks)."""
    p, q = (torch.cat([x, torch.zeros(32, dtype=x.dtype)]) for x in CASES["dirichlet_zeros"])
    p[V + 5], q[V + 20] = 0.05, 0.1  # mass in the later chunks too
    p, q = p / p.sum(), q / q.sum()
    V2 = p.numel()
    g = torch.Generator().manual_seed(11 + k)
    rows = 96  # each row runs 3 chunk programs per parallel launch, L + 1 positions
    P = p.float().expand(rows, k, L + 1, V2)
    Q = q.float().expand(rows, k, L, V2)
    drafts = sample_from_probs(Q, g)
    emitted, n_emit, src = kseq_verify_block(P, Q, drafts, g, use_kernel=True)
    assert (n_emit >= 1).all() and (n_emit <= L + 1).all()
    for t in range(L + 1):
        assert chi2_pvalue(emitted[n_emit > t, t], p) > PASS
    full = n_emit == L + 1  # accepted blocks come from the source draft
    assert torch.equal(emitted[full, :L], drafts[full.nonzero().squeeze(1), src[full]])


# --------------------------------------------------------------------------- full loop, joint law

class Bigram(nn.Module):
    """Toy model: next-token logits depend on the current token only; needs no cache."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(logits)
        self.config = SimpleNamespace(vocab_size=logits.shape[0], n_layers=0, n_heads=1,
                                      head_dim=1, max_seq_len=256)

    def forward(self, tokens, cache=None, positions=None, slots=None, mask=None):
        return self.table[tokens].double()


def _bigram_pair(Vb=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(Vb, Vb, generator=g) * 1.5
    t[0, 1] = t[2, 3] = float("-inf")  # zeros in the target
    d = t + torch.randn(Vb, Vb, generator=g)  # a related but different draft
    d[1, 0] = float("-inf")
    return Bigram(t), Bigram(d)


def joint_index(tokens: torch.Tensor, Vb: int) -> torch.Tensor:
    idx = torch.zeros(tokens.shape[0], dtype=torch.long)
    for t in range(tokens.shape[1]):
        idx = idx * Vb + tokens[:, t]
    return idx


def exact_bigram_joint(model: Bigram, last: int, n: int, params: SamplingParams) -> torch.Tensor:
    probs = logits_to_probs(model.table.detach().double(), params.temperature, params.top_k, params.top_p)
    Vb = probs.shape[0]
    joint = probs[last]  # (V,)
    for _ in range(n - 1):
        # joint over sequences (V^m,), next token depends on the last one
        last_tok = torch.arange(joint.numel()) % Vb
        joint = (joint[:, None] * probs[last_tok]).reshape(-1)
    return joint


def run_loop(target, draft, k, L, params, n_rows, max_new, seed, prompt_tokens=(1, 2),
             device="cpu", cuda_graph=False, dtype=torch.float64):
    torch.manual_seed(seed)
    prompt = torch.tensor(prompt_tokens, device=device).expand(n_rows, -1).contiguous()
    sampler = SpeculativeSampler(target, draft, n_rows, len(prompt_tokens) + max_new + (k + 2) * L + 4,
                                 k=k, draft_len=L, params=params, cuda_graph=cuda_graph,
                                 dtype=dtype)
    out = sampler.generate(prompt, max_new)
    out.tokens, out.logp = out.tokens.cpu(), out.logp.cpu()
    return out


def claimed_law_pvalue(tokens: torch.Tensor, logp: torch.Tensor, Vb: int) -> float:
    """Chi-square of the joint samples against the law the recorded log-probs claim."""
    idx = joint_index(tokens, Vb)
    claimed = torch.zeros(Vb ** tokens.shape[1], dtype=torch.float64)
    claimed[idx] = logp.sum(1).double().exp()
    if claimed.sum() <= 0:
        return 0.0
    return chi2_pvalue(idx, claimed / claimed.sum())


LOOP_CONFIGS = [(1, 2), (2, 2), (4, 1), (4, 3)]


@pytest.mark.parametrize("k,L", LOOP_CONFIGS)
def test_bigram_loop_joint_law(k, L):
    target, draft = _bigram_pair()
    params = SamplingParams(temperature=1.0)
    Vb, n_new, rows = 4, 3, ROWS
    out = run_loop(target, draft, k, L, params, rows, n_new, seed=k * 10 + L)
    exact = exact_bigram_joint(target, 2, n_new, params)
    assert chi2_pvalue(joint_index(out.tokens, Vb), exact) > PASS
    # recorded log-probs are the target's: exactly, and as a claimed law
    assert torch.allclose(out.logp.sum(1).double(), exact[joint_index(out.tokens, Vb)].log(), atol=1e-5)
    assert claimed_law_pvalue(out.tokens, out.logp, Vb) > PASS
    # control: the draft's log-probs recorded as the policy's fail the same checks
    qprobs = logits_to_probs(draft.table.detach().double(), params.temperature)
    prev = torch.cat([torch.full((rows, 1), 2), out.tokens[:, :-1]], 1)
    draft_logp = qprobs[prev, out.tokens].log()
    assert not torch.allclose(draft_logp.sum(1), exact[joint_index(out.tokens, Vb)].log(), atol=1e-3)
    assert claimed_law_pvalue(out.tokens, draft_logp, Vb) < FAIL


def test_bigram_loop_top_k_shared_by_both():
    target, draft = _bigram_pair(Vb=5, seed=4)
    params = SamplingParams(temperature=0.9, top_k=3)
    out = run_loop(target, draft, 3, 2, params, ROWS, 3, seed=7)
    exact = exact_bigram_joint(target, 2, 3, params)
    assert chi2_pvalue(joint_index(out.tokens, 5), exact) > PASS


def _naive_residual(p, q, rho, k):
    res = (p - q).clamp_min(0)
    mass = res.sum(-1, keepdim=True)
    return torch.where(mass > 1e-9, res / mass.clamp_min(1e-30), p)


@pytest.mark.parametrize("control", ["naive_residual", "rho_one"])
def test_bigram_loop_controls_fail(control, monkeypatch):
    if control == "naive_residual":
        monkeypatch.setattr(spec, "kseq_residual", _naive_residual)
    else:
        monkeypatch.setattr(spec, "kseq_rho", lambda p, q, k, *a, **kw: torch.ones(p.shape[0], dtype=p.dtype))
    target, draft = _bigram_pair()
    params = SamplingParams()
    out = run_loop(target, draft, 4, 2, params, ROWS, 3, seed=11)
    assert chi2_pvalue(joint_index(out.tokens, 4), exact_bigram_joint(target, 2, 3, params)) < FAIL


# --------------------------------------------------------------------------- tiny transformers

def _tiny_pair(Vt=5):
    torch.manual_seed(5)
    cfg = dict(vocab_size=Vt, max_seq_len=64, init_std=0.6)
    target = TransformerLM(LMConfig(d_model=16, n_layers=2, n_heads=2, **cfg)).double()
    draft = TransformerLM(LMConfig(d_model=8, n_layers=1, n_heads=2, **cfg)).double()
    return target, draft


def exact_lm_joint(model, prompt, n, params, Vt):
    seqs = torch.cartesian_prod(*[torch.arange(Vt)] * n)  # (V^n, n), first token slowest
    x = torch.cat([torch.tensor(prompt).expand(seqs.shape[0], -1), seqs], 1)
    with torch.no_grad():
        probs = logits_to_probs(model(x), params.temperature, params.top_k, params.top_p)
    T0 = len(prompt)
    lp = probs[:, T0 - 1:T0 - 1 + n].gather(-1, seqs[..., None]).squeeze(-1)
    return lp.prod(1)


@pytest.mark.parametrize("k,L", [(1, 3), (3, 2)])
def test_transformer_loop_joint_law(k, L):
    target, draft = _tiny_pair()
    params = SamplingParams(temperature=0.7)
    prompt = (1, 3, 0)
    out = run_loop(target, draft, k, L, params, ROWS, 3, seed=3 + k, prompt_tokens=prompt)
    exact = exact_lm_joint(target, prompt, 3, params, 5)
    idx = joint_index(out.tokens, 5)
    assert chi2_pvalue(idx, exact) > PASS
    assert torch.allclose(out.logp.sum(1).double(), exact[idx].log(), atol=1e-5)


def test_transformer_loop_control_without_cache_moves_fails(monkeypatch):
    """Control: skipping the move of the accepted block's KV entries must break the checks."""
    from srl.policies.lm import KVCache

    monkeypatch.setattr(KVCache, "move_slots", lambda self, src, dst: None)
    target, draft = _tiny_pair()
    params = SamplingParams(temperature=0.7)
    prompt = (1, 3, 0)
    out = run_loop(target, draft, 3, 2, params, 4_000, 3, seed=4, prompt_tokens=prompt)
    exact = exact_lm_joint(target, prompt, 3, params, 5)
    assert not torch.allclose(out.logp.sum(1).double(), exact[joint_index(out.tokens, 5)].log(), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("k,L", [(1, 3), (4, 2)])
def test_bigram_loop_joint_law_cuda_graph(k, L):
    """The same joint-law check through the CUDA-graph-captured iteration on the GPU (k > 1 runs
    the Triton selection kernel)."""
    target, draft = _bigram_pair()
    exact = exact_bigram_joint(target, 2, 3, SamplingParams())
    target, draft = target.float().cuda(), draft.float().cuda()  # float32: k > 1 uses the kernel
    out = run_loop(target, draft, k, L, SamplingParams(), 50_000, 3, seed=21, device="cuda",
                   cuda_graph=True, dtype=torch.float32)
    assert chi2_pvalue(joint_index(out.tokens, 4), exact) > PASS
    assert torch.allclose(out.logp.sum(1).double(), exact[joint_index(out.tokens, 4)].log().double(), atol=1e-4)


@pytest.mark.gpu
def test_transformer_loop_cuda_graph_bf16_logps_match_full_forward():
    target, draft = _tiny_pair(Vt=64)
    target, draft = target.float().cuda().to(torch.bfloat16), draft.float().cuda().to(torch.bfloat16)
    params = SamplingParams(temperature=0.8)
    out = run_loop(target, draft, 3, 4, params, 64, 40, seed=1, prompt_tokens=(1, 2, 3),
                   device="cuda", cuda_graph=True, dtype=torch.bfloat16)
    seq = torch.cat([torch.tensor([1, 2, 3]).expand(64, 3), out.tokens], 1).cuda()
    from srl.generation.sampling import token_log_probs
    with torch.no_grad():
        want = token_log_probs(target(seq)[:, 2:-1], seq[:, 3:], params).cpu()
    # bf16: cached and full forwards differ by rounding only
    assert (out.logp - want).abs().mean() < 0.05

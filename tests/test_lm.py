"""Transformer LM: config validation, KV-cache decoding equals the full forward, tree layout,
cache moves, sampling utilities, plain sampler bookkeeping."""

import pytest
import torch

from srl.generation.decode import PlainSampler, causal_layout, prefill, tree_layout
from srl.generation.sampling import (SamplingParams, logits_to_probs, sample_from_probs,
                                     token_log_probs)
from srl.policies.lm import KVCache, LMConfig, TransformerLM

VOCAB = 13


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    cfg.update(kw)
    return TransformerLM(LMConfig(**cfg)).eval()


def test_config_validation_names_fields():
    with pytest.raises(ValueError, match="n_heads"):
        LMConfig(vocab_size=10, d_model=30, n_heads=4).validate()
    with pytest.raises(ValueError, match="vocab_size"):
        LMConfig(vocab_size=0).validate()
    with pytest.raises(ValueError, match="even"):
        LMConfig(vocab_size=10, d_model=12, n_heads=4).validate()
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5).validate()


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward_with_ragged_rows():
    model = tiny()
    B, T, S = 4, 12, 32
    x = torch.randint(0, VOCAB, (B, T))
    full = model(x)  # (B, T, V)
    cache = KVCache.for_model(model.config, B, S)
    prefill(model, cache, x[:, :3])  # slots 0..1, lens = 2
    # rows advance at different speeds: row b moves on step s only if (s + b) % (b + 1) == 0
    for step in range(40):
        lens = cache.lens.clone()
        if (lens >= T).all():
            break
        slots, mask = causal_layout(lens.clamp_max(T - 1), 1, S)
        tok = x.gather(1, lens.clamp_max(T - 1)[:, None])
        logits = model(tok, cache, positions=slots, slots=slots, mask=mask)[:, 0]
        want = full[torch.arange(B), lens.clamp_max(T - 1)]
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-4)
        move = torch.tensor([(step + b) % (b + 1) == 0 for b in range(B)]) & (lens < T)
        cache.lens += move.long()
    assert (cache.lens >= T).all()


@torch.no_grad()
def test_tree_pass_and_slot_moves_match_full_forward():
    model = tiny(1)
    B, P, k, L, S = 3, 5, 3, 4, 40
    prefix = torch.randint(0, VOCAB, (B, P + 1))  # last one is x0
    drafts = torch.randint(0, VOCAB, (B, k, L))
    cache = KVCache.for_model(model.config, B, S)
    prefill(model, cache, prefix)  # lens = P
    slots, positions, mask = tree_layout(cache.lens, k, L, S)
    tin = torch.cat([prefix[:, -1:], drafts.reshape(B, k * L)], 1)
    logits = model(tin, cache, positions=positions, slots=slots, mask=mask)
    for j in range(k):
        ref = model(torch.cat([prefix, drafts[:, j]], 1))[:, P:]  # x0 and the block
        torch.testing.assert_close(logits[:, 0], ref[:, 0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits[:, 1 + j * L:1 + (j + 1) * L], ref[:, 1:], atol=1e-5, rtol=1e-4)
    # accept n[b] tokens of draft src[b]: move them behind x0, continue with plain decoding
    src, n = torch.tensor([2, 0, 1]), torch.tensor([3, 1, 4])
    ar = torch.arange(L)
    P0 = cache.lens.clone()
    cache.move_slots(P0[:, None] + 1 + src[:, None] * L + ar, P0[:, None] + 1 + ar)
    cache.lens += 1 + n
    nxt = torch.randint(0, VOCAB, (B, 1))
    s1, m1 = causal_layout(cache.lens, 1, S)
    step = model(nxt, cache, positions=s1, slots=s1, mask=m1)[:, 0]
    for b in range(B):
        seq = torch.cat([prefix[b], drafts[b, src[b], :n[b]], nxt[b]])
        torch.testing.assert_close(step[b], model(seq[None])[0, -1], atol=1e-5, rtol=1e-4)


def test_logits_to_probs_truncation():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    torch.testing.assert_close(logits_to_probs(logits, top_k=2), torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    torch.testing.assert_close(logits_to_probs(logits, top_p=0.8), torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    torch.testing.assert_close(logits_to_probs(logits, temperature=0), torch.tensor([[1.0, 0, 0, 0, 0]]))
    t = logits_to_probs(logits, temperature=2.0)
    torch.testing.assert_close(t, torch.softmax(logits / 2, -1))
    tok = torch.tensor([[0, 3]])
    lp = token_log_probs(logits[:, None].expand(1, 2, 5), tok, SamplingParams(top_k=4))
    torch.testing.assert_close(lp, torch.log(torch.tensor([[0.5, 0.1]]) / 0.95))


def test_sample_from_probs_is_exact_and_skips_zeros():
    from scipy import stats

    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.0, 0.3, 0.2])
    s = sample_from_probs(p.expand(50_000, 4), g)
    counts = torch.bincount(s, minlength=4)
    assert counts[1] == 0
    keep = p > 0
    assert stats.chisquare(counts[keep].double().numpy(), (p[keep].double() * 50_000).numpy()).pvalue > 1e-3


@torch.no_grad()
def test_plain_sampler_records_policy_log_probs():
    model = tiny(2)
    params = SamplingParams(temperature=0.8, top_k=6)
    prompt = torch.randint(0, VOCAB, (5, 4))
    out = PlainSampler(model, 5, 32, params, cuda_graph=False).generate(prompt, 9)
    assert out.tokens.shape == (5, 9)
    seq = torch.cat([prompt, out.tokens], 1)
    want = token_log_probs(model(seq)[:, 3:-1], out.tokens, params)
    torch.testing.assert_close(out.logp, want, atol=1e-5, rtol=1e-4)


def test_value_head_and_training_step():
    model = tiny(3, value_head=True).train()
    x = torch.randint(0, VOCAB, (2, 7))
    logits, values = model.forward_with_value(x)
    assert logits.shape == (2, 7, VOCAB) and values.shape == (2, 7)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1)) + values.pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="value_head"):
        tiny().forward_with_value(x)

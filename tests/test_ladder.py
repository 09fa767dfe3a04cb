"""Ladder Residual in the single-process TransformerLM: the wiring of the paper (each branch reads
the stream without the previous branch's output), a hand-derived one-layer case, cached decoding
equal to the full forward, and the config check."""

import pytest
import torch
import torch.nn.functional as F

from srl.generation.decode import causal_layout, prefill
from srl.policies.lm import KVCache, LMConfig, TransformerLM


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny float64 matmuls: extra threads only contend for the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(residual, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=24, d_model=32, n_layers=3, n_heads=4, max_seq_len=32)
    cfg.update(kw)
    return TransformerLM(LMConfig(residual=residual, **cfg)).double().eval()


def branches(block, x, freqs):
    attn = lambda h: block.attention(block.norm1(h), freqs, None, None, None)  # noqa: E731
    mlp = lambda h: block.mlp(block.norm2(h))  # noqa: E731
    return attn, mlp


@torch.no_grad()
def test_one_layer_ladder_is_parallel_attention_and_mlp():
    # with one block, the MLP reads the stream without the attention output: x + a(x) + m(x)
    model = make("ladder", n_layers=1)
    tokens = torch.randint(0, 24, (2, 7))
    x = model.embed(tokens)
    attn, mlp = branches(model.blocks[0], x, model.rotary(torch.arange(7).expand(2, 7)))
    want = model.head(model.norm(x + attn(x) + mlp(x)))
    torch.testing.assert_close(model(tokens), want, rtol=0, atol=1e-12)
    standard = make("standard", n_layers=1)
    assert (standard(tokens) - want).abs().max() > 1e-3  # standard feeds x + a(x) to the MLP


@torch.no_grad()
def test_ladder_adds_each_branch_one_branch_later():
    model = make("ladder")
    tokens = torch.randint(0, 24, (2, 9))
    x = model.embed(tokens)
    freqs = model.rotary(torch.arange(9).expand(2, 9))
    # modules f_1..f_2L (attention, MLP alternating): f_j reads x_0 + f_1 + ... + f_{j-2}
    mods = [f for block in model.blocks for f in branches(block, x, freqs)]
    outs = []
    for j, f in enumerate(mods):
        outs.append(f(x + sum(outs[:max(j - 1, 0)], torch.zeros_like(x))))
    want = model.head(model.norm(x + sum(outs)))
    torch.testing.assert_close(model(tokens), want, rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_ladder_cached_decoding_equals_full_forward():
    model = make("ladder", seed=3)
    B, T, S = 3, 10, 16
    x = torch.randint(0, 24, (B, T))
    full = model(x)
    cache = KVCache.for_model(model.config, B, S, dtype=torch.float64)
    prefill(model, cache, x[:, :4])  # 3 tokens cached
    for t in range(3, T):
        slots, mask = causal_layout(cache.lens, 1, S)
        out = model(x[:, t:t + 1], cache, positions=slots, slots=slots, mask=mask)[:, 0]
        torch.testing.assert_close(out, full[:, t], rtol=1e-10, atol=1e-10)
        cache.lens += 1


def test_ladder_trains_and_config_is_checked():
    model = make("ladder").float().train()
    tokens = torch.randint(0, 24, (4, 12))
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="residual"):
        LMConfig(vocab_size=8, residual="parallel").validate()

"""The LM's attention on srl's FlashAttention (CUDA's path, here through the Triton interpreter):
the causal training forward and its gradients, prefill, ragged decoding (per-row cache lengths)
and the speculative tree pass (k drafts over a shared prefix), against the float64 SDPA path."""
import copy
import importlib

import pytest
import torch

import srl.policies.lm as lm
from srl.generation.decode import causal_slot_mask, prefill, tree_slot_mask
from srl.policies.lm import KVCache, LMConfig, TransformerLM

VOCAB = 13


@pytest.fixture
def kernel_calls(monkeypatch):
    """Route the LM's attention to the kernels on CPU (the interpreter) and count the calls."""
    import srl.kernels as kernels

    calls = []
    real = kernels.flash_attention

    def counted(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(lm, "_kernels_apply", lambda q: q.dtype == torch.float32)
    monkeypatch.setattr(kernels, "flash_attention", counted)
    return calls


def _models(seed=0):
    torch.manual_seed(seed)
    model = TransformerLM(LMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)).eval()
    return model, copy.deepcopy(model).double()  # head width 16: a width the kernels take


def test_training_forward_and_gradients_match_the_float64_reference(kernel_calls):
    model, ref = _models()
    x = torch.randint(0, VOCAB, (3, 20))
    out, want = model(x), ref(x)
    (out.square().mean()).backward()
    (want.square().mean()).backward()
    assert len(kernel_calls) == 2 and all(kw.get("causal") for kw in kernel_calls)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, atol=1e-6, rtol=2e-3, msg=name)
    no_kernels = copy.deepcopy(model)
    for block in no_kernels.blocks:  # LMConfig.kernels=False: the SDPA path, same function
        block.kernels = False
    torch.testing.assert_close(no_kernels(x), out, atol=2e-5, rtol=1e-4)
    assert len(kernel_calls) == 2


@torch.no_grad()
@pytest.mark.parametrize("route", ["decode", "forward"])
def test_prefill_ragged_decode_and_tree_pass_on_the_kernels(kernel_calls, route, monkeypatch):
    """The tree pass (13 query rows) on the split-KV decode kernel and on the forward kernel."""
    if route == "decode":  # the forward kernel runs the tree pass unless asked
        monkeypatch.setattr(importlib.import_module("srl.kernels.flash_attention"), "_DECODE_STARTS", True)
    model, ref = _models(1)
    B, P, k, L, S = 3, 6, 3, 4, 40
    prefix = torch.randint(0, VOCAB, (B, P + 1))
    drafts = torch.randint(0, VOCAB, (B, k, L))
    cache = KVCache.for_model(model.config, B, S)
    prefill(model, cache, prefix)  # lens = P, on the kernels with per-row lengths
    cache.lens -= torch.tensor([0, 1, 2])  # rows at different lengths: drop the last prompt slots
    slots, positions, mask = tree_slot_mask(cache.lens, k, L, S)
    x0 = prefix.gather(1, cache.lens[:, None])
    logits = model(torch.cat([x0, drafts.reshape(B, k * L)], 1), cache, positions=positions, slots=slots, mask=mask)
    assert any(kw.get("kv_prefix") is not None for kw in kernel_calls)
    for b in range(B):
        n = int(cache.lens[b])
        for j in range(k):
            seq = torch.cat([prefix[b, :n + 1], drafts[b, j]])[None]
            want = ref(seq)[0, n:]  # x0 and the block, full causal forward in float64
            torch.testing.assert_close(logits[b, 0].double(), want[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(logits[b, 1 + j * L:1 + (j + 1) * L].double(), want[1:], atol=1e-4, rtol=1e-4)
    # negative control: without the shared prefix the drafts' logits change
    bad = type(mask)(mask.dense, mask.kv_lens, mask.kv_start)
    wrong = model(torch.cat([x0, drafts.reshape(B, k * L)], 1), cache, positions=positions, slots=slots, mask=bad)
    assert (wrong[:, 1:] - logits[:, 1:]).abs().max() > 1e-3
    # one more token per row after x0 at each row's own length (flash_decode with kv_lens)
    s1, m1 = causal_slot_mask(cache.lens, 1, S)
    step = model(x0, cache, positions=s1, slots=s1, mask=m1)[:, 0]
    for b in range(B):
        torch.testing.assert_close(step[b].double(), ref(prefix[b, :int(cache.lens[b]) + 1][None])[0, -1],
                                   atol=1e-4, rtol=1e-4)

"""Tensor parallelism on CPU with gloo, 2 and 4 spawned ranks: the TP model (standard and ladder
residual) equals the single-process model in float64 (logits, gradients, inference with the
asynchronous reduction), full checkpoints move between group sizes, and TP generation emits
the single-process tokens under the same seed. Negative controls show each check can fail."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from srl.generation.decode import PlainSampler
from srl.generation.sampling import SamplingParams
from srl.generation.speculative import SpeculativeSampler
from srl.parallel import (Split, TPContext, follow, full_state_dict, launch_group, load_full,
                          parallelize, save_full, share_job)
from srl.parallel import layers
from srl.policies.lm import LMConfig, TransformerLM

CFG = dict(vocab_size=32, d_model=32, n_layers=3, n_heads=4, max_seq_len=64, mlp_ratio=2)


def make(seed=0, residual="standard", mlp="gelu", **kw) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = {**CFG, **kw}
    return TransformerLM(LMConfig(residual=residual, mlp={"type": mlp}, **cfg)).double().eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _logits_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    if model.value is None:
        logits, value = model(x), torch.zeros(())
    else:
        logits, value = model.forward_with_value(x)
    (F.cross_entropy(logits.flatten(0, 1), y.flatten()) + value.square().mean()).backward()
    return logits.detach()


# --------------------------------------------------------------------------- rank programs

def _check_equal(tp: TPContext, residual: str, mlp: str, tie: bool) -> dict:
    """Errors of the TP model against the single-process one, and of two negative controls."""
    ref = make(1, residual, mlp, tie_embeddings=tie, value_head=True)
    model = parallelize(copy.deepcopy(ref), tp)
    torch.manual_seed(2)
    x, y = torch.randint(0, CFG["vocab_size"], (2, 2, 9))
    want = _logits_and_grads(ref, x, y)
    got = _logits_and_grads(model, x, y)
    ref_grads = {n: p.grad for n, p in ref.named_parameters(remove_duplicate=False)}
    assert all(g is not None for g in ref_grads.values())
    tp_grads = full_state_dict(model, grads=True)
    with torch.no_grad():  # inference: the branch all-reduce runs asynchronously
        infer = model(x)
        _, value = model.forward_with_value(x)
        other = make(1, "ladder" if residual == "standard" else "standard", mlp, tie_embeddings=tie)(x)
    layers.SPLITS["qkv"] = Split(0, groups=1)  # wrong: ranks get q heads only, no k and v
    try:
        wrong = parallelize(copy.deepcopy(ref), tp)
    finally:
        layers.SPLITS["qkv"] = Split(0, groups=3)
    with torch.no_grad():
        wrong_logits = wrong(x)
        value_ref = ref.forward_with_value(x)[1]
    return {
        "logits": max_diff(got, want), "inference": max_diff(infer, want),
        "value": max_diff(value, value_ref),
        "grads": max(max_diff(tp_grads[n], g) for n, g in ref_grads.items()),
        "grad_names": sorted(tp_grads) == sorted(ref_grads),
        "other_residual": max_diff(other, want), "wrong_split": max_diff(wrong_logits, want),
        "local_qkv_rows": model.blocks[0].qkv.weight.shape[0],
    }


def _train_and_save(tp: TPContext, path: str, residual: str) -> torch.Tensor:
    """A few SGD steps under TP (so the weights are no longer the seed's), then a full save."""
    model = parallelize(make(3, residual, "swiglu"), tp)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.manual_seed(4)
    for _ in range(3):
        x, y = torch.randint(0, CFG["vocab_size"], (2, 2, 9))
        _logits_and_grads(model, x, y)
        opt.step()
    save_full(model, path)
    with torch.no_grad():
        return model(_probe())


def _load(tp: TPContext, path: str, residual: str) -> torch.Tensor:
    model = parallelize(make(99, residual, "swiglu"), tp)
    load_full(model, path)
    with torch.no_grad():
        return model(_probe())


def _probe() -> torch.Tensor:
    return torch.arange(20).reshape(2, 10) % CFG["vocab_size"]


def _generate(tp: TPContext | None, residual: str, seed: int) -> dict:
    """Plain and speculative (k = 1, 2) tokens of the target, TP when ``tp`` is given."""
    target = make(5, residual, init_std=0.3)
    if tp is not None:
        parallelize(target, tp)
    draft = make(6, "standard", d_model=16, n_layers=1, n_heads=2, init_std=0.3)
    params = SamplingParams(temperature=1.0, top_k=20)
    prompt = torch.randint(0, CFG["vocab_size"], (3, 4), generator=torch.Generator().manual_seed(7))
    out = {}
    plain = PlainSampler(target, 3, 40, params, cuda_graph=False,
                         generator=torch.Generator().manual_seed(seed))
    out["plain"] = plain.generate(prompt, 16).tokens
    for k in (1, 2):
        spec = SpeculativeSampler(target, draft, 3, 48, k=k, draft_len=3, params=params,
                                  cuda_graph=False, generator=torch.Generator().manual_seed(seed))
        out[f"spec{k}"] = spec.generate(prompt, 16).tokens
    return out


def _lockstep(tp: TPContext | None):
    """Rank 0 takes two jobs of different shapes and shares them; rank 1 follows."""
    target = make(5, "ladder", init_std=0.3)
    if tp is not None:
        parallelize(target, tp)
    sampler = PlainSampler(target, 2, 40, SamplingParams(), cuda_graph=False,
                           generator=torch.Generator().manual_seed(21))
    if tp is not None and tp.rank > 0:
        return follow(tp, sampler)
    outs = []
    for T0, n in ((4, 8), (6, 12)):
        prompts = torch.randint(0, CFG["vocab_size"], (2, T0), generator=torch.Generator().manual_seed(T0))
        if tp is not None:
            share_job(tp, prompts, n)
        outs.append(sampler.generate(prompts, n).tokens)
    if tp is not None:
        share_job(tp, None)
    return outs


def _suite_4(tp: TPContext, path: str) -> dict:
    """Everything the 4-rank group checks, in one launch (spawning ranks is the slow part)."""
    return {"equal": {r: _check_equal(tp, r, "swiglu", False) for r in ("standard", "ladder")},
            "written": _train_and_save(tp, path, "ladder")}


def _suite_2(tp: TPContext, path: str) -> dict:
    return {"equal": {r: _check_equal(tp, r, "gelu", True) for r in ("standard", "ladder")},
            "loaded": _load(tp, path, "ladder"),
            "generated": {r: _generate(tp, r, seed=11) for r in ("standard", "ladder")},
            "broadcast": tp.broadcast(torch.full((3,), float(tp.rank + 1))).tolist(),
            "lockstep": _lockstep(tp)}


# --------------------------------------------------------------------------- tests

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny float64 matmuls: threads only contend with the ranks for the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tp") / "model.safetensors")


@pytest.fixture(scope="module")
def group4(checkpoint_path) -> list[dict]:
    return launch_group(4, _suite_4, checkpoint_path)


@pytest.fixture(scope="module")
def group2(group4, checkpoint_path) -> list[dict]:  # loads what the 4 ranks wrote
    return launch_group(2, _suite_2, checkpoint_path)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("residual", ["standard", "ladder"])
def test_tp_logits_and_gradients_equal_single_process(world, residual, group2, group4):
    for rank in group2 if world == 2 else group4:
        r = rank["equal"][residual]
        assert r["local_qkv_rows"] == 3 * CFG["d_model"] // world
        assert r["grad_names"]
        assert r["logits"] < 1e-12 and r["inference"] < 1e-12 and r["value"] < 1e-12
        assert r["grads"] < 1e-12
        assert r["other_residual"] > 1e-3  # ladder and standard are different models
        assert r["wrong_split"] > 1e-3  # a wrong QKV split is caught


def test_checkpoint_from_4_ranks_loads_on_2_and_1(group4, group2, checkpoint_path):
    written = [r["written"] for r in group4]
    one = make(42, "ladder", "swiglu")
    with torch.no_grad():
        before = one(_probe())
        load_full(one, checkpoint_path)
        on_one = one(_probe())
    for out in written[1:] + [r["loaded"] for r in group2]:
        assert max_diff(out, written[0]) < 1e-12
    assert max_diff(on_one, written[0]) < 1e-12
    assert max_diff(before, written[0]) > 1e-3  # loading changed the model
    saved = set(load_file(checkpoint_path))
    assert saved == set(one.state_dict()) - {"head.weight"}  # the tied head is stored once


@pytest.mark.parametrize("residual", ["standard", "ladder"])
def test_generation_on_2_ranks_emits_single_process_tokens(residual, group2):
    want = _generate(None, residual, seed=11)
    for rank in group2:
        got = rank["generated"][residual]
        for name, tokens in want.items():
            assert torch.equal(got[name], tokens), name
    other_seed = _generate(None, residual, seed=12)
    assert not torch.equal(other_seed["plain"], want["plain"])


def test_leader_broadcast_reaches_every_rank(group2):
    assert [r["broadcast"] for r in group2] == [[1.0] * 3] * 2  # rank 0's tensor on both


def test_followers_generate_in_lockstep_with_rank_0(group2):
    want = _lockstep(None)
    leader, follower = (r["lockstep"] for r in group2)
    assert follower == len(want)  # jobs run by rank 1 before the stop
    assert all(torch.equal(a, b) for a, b in zip(leader, want))


def test_uneven_split_is_refused():
    with pytest.raises(ValueError, match="n_heads"):
        parallelize(make(0), TPContext(0, 3))
    with pytest.raises(ValueError, match="attention.pattern"):  # per-head sparse pattern
        parallelize(make(0, attention={"pattern": "s2", "block": 16}), TPContext(0, 2))
    with pytest.raises(RuntimeError, match="ValueError"):  # a failing rank fails the launch
        launch_group(2, _parallelize_three)


def _parallelize_three(tp: TPContext):
    parallelize(make(0), TPContext(tp.rank, 3))


# --------------------------------------------------------------------------- GPU (NCCL)

def _nccl_graph_collectives(tp: TPContext) -> dict:
    """Async all-reduce (waited later) and all-gather captured in a CUDA graph, then replayed."""
    import torch.distributed as dist

    from srl.parallel.comm import _GatherFromRanks

    x = torch.arange(8, dtype=torch.float32, device=tp.device)
    out = torch.empty(8, device=tp.device)
    gathered = torch.empty(8, device=tp.device)

    def step():
        y = x * 2
        work = dist.all_reduce(y, async_op=True)
        z = x + 1  # compute while the reduction is in flight
        work.wait()
        out.copy_(y + z)
        gathered.copy_(_GatherFromRanks.apply(x[None], None)[0])

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.add_(1)
    graph.replay()
    torch.cuda.synchronize()
    return {"out": out.cpu(), "gathered": gathered.cpu(), "want": (x * 3 + 1).cpu(), "x": x.cpu()}


@pytest.mark.gpu
def test_nccl_async_all_reduce_and_gather_replay_in_cuda_graph():
    r, = launch_group(1, _nccl_graph_collectives, backend="nccl")
    assert torch.equal(r["out"], r["want"]) and torch.equal(r["gathered"], r["x"])


@pytest.mark.gpu
@pytest.mark.parametrize("residual", ["standard", "ladder"])
def test_parallelized_model_samples_under_cuda_graphs(residual):
    # one rank: the TP layers and the sharded cache under PlainSampler's CUDA graphs
    ref = make(5, residual, init_std=0.3).float().cuda()
    tp_model = parallelize(copy.deepcopy(ref), TPContext(0, 1, device=torch.device("cuda")))
    prompt = torch.randint(0, CFG["vocab_size"], (4, 5), device="cuda")
    outs = []
    for m in (ref, tp_model):
        g = torch.Generator(device="cuda").manual_seed(3)
        s = PlainSampler(m, 4, 64, SamplingParams(), cuda_graph=True, generator=g)
        assert s._step.graph is not None
        outs.append(s.generate(prompt, 24).tokens)
        s.close()
    assert torch.equal(outs[0], outs[1])

"""Memory policies (transformer, GRU): stepwise inference equals the learner's sequence pass, no
memory leaks between envs or across resets, per-env state tables, and whole-system learning on a
task an MLP cannot solve."""
import os

import numpy as np
import pytest
import torch

import srl.policies.memory as memory
from srl.config import ConfigError, PolicyConfig, experiment_from_dict, load_experiment
from srl.envs.memory import RepeatFirstVectorEnv
from srl.envs.vector import SpaceInfo
from srl.experiment import controller_for
from srl.policies.memory import GRUActorCritic, TransformerActorCritic
from srl.policies.state import StateTable, state_spec
from srl.policies.weights import load_numpy_weights

INFO = SpaceInfo((5,), True, 4)
KINDS = {"transformer": TransformerActorCritic, "gru": GRUActorCritic}


def _policy(kind, seed=0, memory_len=3, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = PolicyConfig(type=kind, d_model=16, heads=2, layers=2, memory=memory_len, hidden=[16])
    return KINDS[kind](INFO, cfg).to(dtype)


def _warm_state(policy, B, steps=4, seed=1):
    """A state that remembers a few random steps (a non-trivial start of a trajectory)."""
    g = torch.Generator().manual_seed(seed)
    state = policy.initial_state(B)
    for _ in range(steps):
        obs = torch.randn(B, 5, generator=g, dtype=torch.float64)
        _, _, state = policy.act(obs, torch.zeros(B, dtype=torch.bool), state)
    return state


def _stepwise_logp(policy, obs, action, first, state):
    """log-probs of ``action`` replayed one step at a time through ``act``'s state handling."""
    out = []
    for t in range(action.shape[0]):
        fresh = policy.initial_state(obs.shape[1])
        keep = ~first[t]
        state = {k: torch.where(keep.view(-1, *[1] * (v.dim() - 1)), v, fresh[k]) for k, v in state.items()}
        h, state = policy.core_step(policy._encode(obs[t]), state)
        out.append(torch.log_softmax(policy.actor(h), -1).gather(-1, action[t, :, None]).squeeze(-1))
    return torch.stack(out)


def _trajectory(B=4, T=11, seed=2):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(T + 1, B, 5, generator=g, dtype=torch.float64)
    first = torch.zeros(T + 1, B, dtype=torch.bool)
    first[0, 0] = True  # env 0 starts an episode at the trajectory's first step
    first[3, 1] = first[7, 1] = True  # env 1: two episode starts inside
    first[9, 2] = True  # env 2: one late start; env 3: none (memory from before throughout)
    action = torch.randint(0, 4, (T, B), generator=g)
    return obs, action, first


@pytest.mark.parametrize("kind", ["transformer", "gru"])
def test_stepwise_inference_equals_the_sequence_pass(kind):
    policy = _policy(kind)
    obs, action, first = _trajectory()
    state = _warm_state(policy, obs.shape[1])
    logp, entropy, value, _ = policy.evaluate_sequence(obs, action, first, state)
    want = _stepwise_logp(policy, obs, action, first, state)
    assert logp.shape == action.shape and value.shape == first.shape
    assert torch.allclose(logp, want, atol=1e-12, rtol=0)
    # the start state matters where no episode started at step 0 (and not where one did)
    noisy = {k: v + torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    moved = (policy.evaluate_sequence(obs, action, first, noisy)[0] - logp).abs()
    assert moved[:, 0].max() == 0 and moved[0, 1:].min() > 0


def test_transformer_window_and_episode_masks_are_both_needed():
    """Negative controls: a sequence pass that ignores episode starts, or the window, differs."""
    policy = _policy("transformer", memory_len=3)
    obs, action, first = _trajectory()
    state = _warm_state(policy, obs.shape[1])
    logp = policy.evaluate_sequence(obs, action, first, state)[0]
    real = memory._sequence_starts
    try:
        memory._sequence_starts = lambda f, c, M: real(torch.zeros_like(f), c, M)
        no_starts = policy.evaluate_sequence(obs, action, first, state)[0]
        memory._sequence_starts = lambda f, c, M: (real(f, c, M + 4) - 4).clamp_min(0)
        wide = policy.evaluate_sequence(obs, action, first, state)[0]
    finally:
        memory._sequence_starts = real
    assert (no_starts - logp)[:, 1].abs().max() > 1e-6  # env 1 saw across its episode starts
    assert (wide - logp)[:, 3].abs().max() > 1e-6  # env 3 saw more than M steps back


@pytest.mark.parametrize("kind", ["transformer", "gru"])
def test_memory_never_leaks_between_envs_or_across_a_reset(kind):
    policy = _policy(kind)
    g = torch.Generator().manual_seed(3)
    obs = torch.randn(6, 3, 5, generator=g, dtype=torch.float64)
    other = obs.clone()
    other[:, 1:] = torch.randn(6, 2, 5, generator=g, dtype=torch.float64)  # envs 1, 2 differ
    first = torch.zeros(6, 3, dtype=torch.bool)
    first[4, 0] = True  # env 0 resets at step 4

    def run(x):
        state, out = policy.initial_state(3), []
        for t in range(x.shape[0]):
            _, logp, state = policy.act(x[t], first[t], state, deterministic=True)
            out.append(logp)
        return torch.stack(out)

    a, b = run(obs), run(other)
    assert torch.equal(a[:, 0], b[:, 0]) and not torch.equal(a[:, 1], b[:, 1])
    # after its reset env 0 acts as a fresh env that saw only steps 4 and 5
    fresh_state, fresh = policy.initial_state(1), []
    for t in (4, 5):
        fresh.append(policy.act(obs[t, :1], torch.zeros(1, dtype=torch.bool), fresh_state, deterministic=True))
        fresh_state = fresh[-1][2]
    assert torch.allclose(a[4:, 0], torch.cat([f[1] for f in fresh]), atol=1e-12)
    first[4, 0] = False  # negative control: without the reset, env 0 remembers steps 0-3
    assert not torch.allclose(run(obs)[4:, 0], a[4:, 0])


@pytest.mark.parametrize("kind", ["transformer", "gru"])
def test_weights_round_trip_keeps_the_policy(kind):
    policy, copy = _policy(kind, seed=0, dtype=torch.float32), _policy(kind, seed=9, dtype=torch.float32)
    obs, action, first = _trajectory()
    obs = obs.float()
    state = {k: v.float() if v.is_floating_point() else v for k, v in _warm_state(policy.double(), 4).items()}
    policy.float()
    before = copy.evaluate_sequence(obs, action, first, state)[0]
    load_numpy_weights(copy, {k: v.detach().numpy() for k, v in policy.state_dict().items()})
    assert torch.equal(copy.evaluate_sequence(obs, action, first, state)[0],
                       policy.evaluate_sequence(obs, action, first, state)[0])
    assert not torch.equal(before, policy.evaluate_sequence(obs, action, first, state)[0])


def test_state_table_keeps_each_env_row_and_grows():
    policy = _policy("gru", dtype=torch.float32)
    table = StateTable(policy, max_envs=16, capacity=2)
    ids = np.array([7, 3, 11], dtype=np.int64)
    rows, state = table.get(ids)
    assert len(table) == 3 and all(v.shape[0] == 3 for v in state.values())
    table.put(rows, {"h": torch.arange(3.0)[:, None].expand(3, 16)})
    rows2, state2 = table.get(np.array([11, 7], dtype=np.int64))
    assert state2["h"][:, 0].tolist() == [2.0, 0.0]
    assert state_spec(policy) == {"h": ((16,), "float32")}
    assert state_spec(torch.nn.Linear(2, 2)) == {}


def test_repeat_first_rewards_only_the_remembered_cue():
    env = RepeatFirstVectorEnv(num_envs=64, delay=3, n_cues=4)
    obs, _ = env.reset(seed=0)
    cue = obs[:, :4].argmax(1)
    assert (obs[:, :4].sum(1) == 1).all() and (obs[:, 4] == 0).all()
    for _ in range(2):  # silent steps
        obs, reward, term, trunc, _ = env.step(np.zeros(64, np.int64))
        assert not obs.any() and not reward.any() and not term.any()
    obs, reward, term, _, _ = env.step(np.zeros(64, np.int64))
    assert (obs[:, 4] == 1).all() and not obs[:, :4].any()  # the query
    answer = np.where(np.arange(64) % 2 == 0, cue, (cue + 1) % 4)  # half right, half wrong
    obs, reward, term, _, _ = env.step(answer)
    assert term.all() and (reward == (np.arange(64) % 2 == 0)).all()
    obs, reward, term, _, _ = env.step(np.zeros(64, np.int64))  # the autoreset step: a new cue
    assert not reward.any() and not term.any() and (obs[:, :4].sum(1) == 1).all()


def _memory_cfg(tmp_path, **over):
    data = {
        "name": "memory-test", "seed": 1,
        "env": {"id": "srl/RepeatFirst-v0", "kwargs": {"delay": 4, "n_cues": 4}},
        "policy": {"type": "transformer", "d_model": 16, "layers": 1, "heads": 2, "memory": 6, "hidden": [16]},
        "algorithm": {"type": "ppo", "epochs": 4, "minibatches": 2, "batch_size": 480, "ent_coef": 0.01,
                      "gae_lambda": 0.95, "gamma": 0.9},
        "optimizer": {"type": "adam", "lr": 3.0e-3},
        "workers": {"actors": {"count": 1, "envs_per_actor": 16, "rollout_len": 30, "inline_policy": True}},
        "stop": {"mean_return": 0.9, "window": 100, "env_steps": 400_000},
        "log": {"dir": str(tmp_path), "tensorboard": False, "console": False, "every_s": 0.5},
    }
    return experiment_from_dict(data, [f"{k}={v}" for k, v in over.items()])


@pytest.mark.parametrize("over", [{}, {"policy.type": "gru"}], ids=["transformer", "gru"])
def test_memory_policy_learns_what_it_must_remember(tmp_path, over):
    ctl = controller_for(_memory_cfg(tmp_path, **over), str(tmp_path / "run"))
    result = ctl.run()
    assert result.reason == "mean_return" and result.mean_return >= 0.75, result  # stopped at >= 0.9


def test_an_mlp_stays_near_chance_on_the_same_task(tmp_path):
    """The negative control: without memory the cue is gone by the query (chance is 1/4)."""
    cfg = _memory_cfg(tmp_path, **{"policy.type": "mlp", "stop.env_steps": 16_000})
    result = controller_for(cfg, str(tmp_path / "run")).run()
    assert result.reason == "env_steps" and result.mean_return < 0.45, result


def test_memory_policy_refuses_round_robin_over_several_policy_workers(tmp_path):
    with pytest.raises(ConfigError, match="workers.policies.routing"):
        _memory_cfg(tmp_path, **{"workers.actors.inline_policy": "false", "workers.policies.count": 2,
                                 "workers.policies.routing": "round_robin"})


def test_the_memory_configs_load():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("memory_transformer.yaml", "memory_gru.yaml"):
        cfg = load_experiment(os.path.join(root, "configs", name))
        assert cfg.env.id == "srl/RepeatFirst-v0" and cfg.env.kwargs["delay"] == 64


@pytest.mark.parametrize("name", ["memory_popgym.yaml", "memory_minigrid.yaml"])
def test_the_package_memory_tasks_run_through_the_dataflow(tmp_path, name):
    """POPGym and MiniGrid configs: their envs build, the transformer steps them through actors
    and trainer, and the run stops at its env-step budget with episodes counted."""
    pytest.importorskip("popgym" if "popgym" in name else "minigrid")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_experiment(os.path.join(root, "configs", name),
                          ["stop.env_steps=6000", "algorithm.batch_size=2048", "workers.actors.rollout_len=32",
                           f"log.dir={tmp_path}", "log.tensorboard=false", "log.console=false"])
    result = controller_for(cfg, str(tmp_path / "run")).run()
    assert result.reason == "env_steps" and result.env_steps >= 6000 and result.episodes > 0, result


def test_srl_kernels_exports_the_attention_functions():
    from srl.kernels import flash_attention, flash_decode

    assert callable(flash_attention) and flash_attention.__name__ == "flash_attention"
    assert callable(flash_decode) and flash_decode.__name__ == "flash_decode"


def test_the_policy_step_through_the_decode_kernel_matches_the_reference():
    """The kernel path of a transformer step (CUDA's) equals the reference path, through the
    Triton interpreter, in float32 with per-env cache lengths."""
    from srl.kernels import flash_decode
    from srl.kernels._reference import attention_reference

    g = torch.Generator().manual_seed(4)
    q = torch.randn(5, 2, 1, 16, generator=g)
    k, v = torch.randn(5, 2, 7, 16, generator=g), torch.randn(5, 2, 7, 16, generator=g)
    lens = torch.tensor([1, 3, 7, 2, 5])
    want = attention_reference(q.double(), k.double(), v.double(), kv_lens=lens)
    got = flash_decode(q, k, v, causal=False, kv_lens=lens, num_splits=1)
    assert torch.allclose(got.double(), want, atol=1e-4)
    wrong = flash_decode(q, k, v, causal=False, kv_lens=lens.clamp(max=2), num_splits=1)  # negative control
    assert not torch.allclose(wrong.double(), want, atol=1e-3)


def test_the_learner_pass_through_the_flash_kernel_matches_the_masked_reference(monkeypatch):
    """The CUDA path of ``evaluate_sequence`` (srl's FlashAttention with per-row key starts, here
    through the Triton interpreter) gives the same log-probs, values and gradients as the masked
    torch path, in float32; dropping the starts (a negative control) does not."""
    torch.manual_seed(0)
    cfg = PolicyConfig(type="transformer", d_model=32, heads=2, layers=2, memory=3, hidden=[16])
    policy = TransformerActorCritic(INFO, cfg).double()  # head width 16: a width the kernels take
    obs, action, first = _trajectory()
    state = _warm_state(policy, 4)
    policy.float()
    obs, state = obs.float(), {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

    def run():
        policy.zero_grad()
        logp, _, value, _ = policy.evaluate_sequence(obs, action, first, state)
        (logp.sum() + value.square().sum()).backward()
        return logp.detach(), value.detach(), [p.grad.clone() for p in policy.parameters() if p.grad is not None]

    want = run()
    monkeypatch.setattr(memory, "_kernels_apply", lambda q, kernels: kernels)
    got = run()
    for a, b in zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2])):
        assert torch.allclose(a, b, atol=2e-4, rtol=1e-3), (a - b).abs().max()
    real = memory._sequence_starts
    monkeypatch.setattr(memory, "_sequence_starts", lambda f, c, M: real(f, c, M) * 0)
    assert (run()[0] - want[0]).abs().max() > 1e-3


@pytest.mark.gpu
def test_gpu_graphed_step_keeps_the_same_memories_as_the_eager_step():
    """Replays of the captured step (padded buckets, resets, envs arriving late) leave every env's
    memory equal to the eager step's, and report the log-prob of the action they sampled."""
    from srl.policies.graphed import GraphedMemoryStep

    torch.manual_seed(0)
    cfg = PolicyConfig(type="transformer", d_model=64, heads=2, layers=2, memory=8, hidden=[32])
    policy = TransformerActorCritic(INFO, cfg).cuda()
    graphed = GraphedMemoryStep(policy, max_envs=40, max_batch=32, obs_shape=(5,), obs_dtype="float32", device="cuda")
    eager = StateTable(policy, max_envs=40, device="cuda")
    g = np.random.default_rng(1)
    for step in range(12):
        ids = g.choice(40, size=int(g.integers(1, 30)), replace=False).astype(np.int64)
        obs = g.standard_normal((len(ids), 5)).astype(np.float32)
        first = g.random(len(ids)) < 0.2
        action, logp = graphed.step(obs, first, ids)
        rows, st = eager.get(ids)
        obs_t, first_t = torch.from_numpy(obs).cuda(), torch.from_numpy(first).cuda()
        with torch.no_grad():
            reset = {k: v.masked_fill(first_t.view(-1, *[1] * (v.dim() - 1)), 0) for k, v in st.items()}
            h, new = policy.core_step(policy._encode(obs_t), reset)
            want = torch.log_softmax(policy.actor(h), -1).gather(-1, torch.from_numpy(action).cuda()[:, None])[:, 0]
        eager.put(rows, new)
        assert np.allclose(logp, want.cpu().numpy(), atol=1e-3)
        g_rows = graphed.table.rows_of(ids)
        for k in new:
            assert torch.allclose(graphed.table.table[k][g_rows].float(), eager.table[k][rows].float(), atol=1e-3)


def test_kill_9_of_a_policy_worker_holding_memories_and_the_run_still_learns(tmp_path):
    """Two sticky policy workers hold the memories (each env's on one of them); one is killed,
    its restart starts its envs' memories afresh, and the run goes on and learns."""
    import signal
    import threading

    from test_faults import _wait

    cfg = _memory_cfg(tmp_path, **{"workers.actors.inline_policy": "false", "workers.actors.ring": 2,
                                   "workers.policies.count": 2})
    ctl = controller_for(cfg, str(tmp_path / "run"))
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("result", ctl.run()), daemon=True)
    th.start()
    try:
        _wait(lambda: ctl.counters["env_steps"] > 3000 and "policy/0" in ctl.worker_stats)
        os.kill(ctl.scheduler.pid("policy/0"), signal.SIGKILL)
        _wait(lambda: ctl.restarts >= 1)
        th.join(timeout=120)
    finally:
        ctl.request_stop()
        th.join(timeout=60)
    result = box["result"]
    assert result.restarts >= 1 and result.reason == "mean_return", result
    # sticky: no env reached both workers (what each served is reported at exit; the restarted
    # one may have served nothing if the run reached its stop rule right after the restart)
    served = [set(ctl.worker_stats[f"policy/{p}"].get("envs", [])) for p in range(2)]
    assert served[0] | served[1] and not served[0] & served[1]

"""Language-model policies trained by RL inside the dataflow (issue 14, CPU part).

Token tasks under the protocol, GRPO's math against hand-computed float64 values, the sample
stream carrying the policy's log-probabilities (with a negative control recording the draft's),
the draft worker's one use of every sequence, and live runs of configs/rlhf_tiny.yaml: it learns
until its mean reward clearly rises, and it finishes after kill -9 of the generation worker and of
the draft worker.
"""
import json
import math
import os
import signal
import threading

import numpy as np
import pytest
import torch
import yaml

from srl.algorithms.grpo import GRPOLearner, clipped_token_loss, grpo_loss, group_advantages, kl_k3
from srl.config import experiment_from_dict
from srl.envs.text import VOCAB, Addition, Sort
from srl.envs.tokens import build_task, finish_completions, sampling_params
from srl.errors import ConfigError
from srl.experiment import Experiment, controller_for
from srl.generation.draft import DraftAlignConfig, DraftAligner
from srl.generation.sampling import token_log_probs
from srl.plan import DRAFT_PARAMS, DRAFT_SAMPLES, PROMPTS, compile_plan
from srl.policies.lm_policy import LMPolicy
from srl.system import wire
from srl.workers.draft import DraftDistiller
from srl.workers.generation import build_draft, generate, make_sampler
from srl.workers.token_layout import token_layout
from test_faults import _wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "rlhf_tiny.yaml")
EXACT_ATOL = 1e-4
"""How far the stream's log-probabilities may be from the policy's own (float32 round-off)."""


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread (a shared 2-core machine thrashes with more)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(tmp_path=None, **over):
    data = yaml.safe_load(open(TINY))
    if tmp_path is not None:
        data["log"] = {"dir": str(tmp_path), "tensorboard": False, "console": False, "every_s": 0.5}
    return experiment_from_dict(data, [f"{k}={v}" for k, v in over.items()])


# --------------------------------------------------------------------------- the user's side


@pytest.mark.parametrize("task", [Addition(n_digits=2), Sort(length=4)])
def test_builtin_tasks_follow_the_token_protocol(task):
    rng = np.random.default_rng(0)
    prompts = task.sample_prompts(16, rng)
    assert prompts.shape == (16, task.prompt_len) and prompts.dtype == np.int64
    assert task.vocab_size == len(VOCAB) and task.eos_id == VOCAB.eos and task.pad_id == VOCAB.pad
    right = np.array([task.answer(p) + [task.eos_id] for p in prompts])
    assert right.shape[1] == task.answer_len
    np.testing.assert_array_equal(task.reward(prompts, right), np.ones(16))
    wrong = right.copy()
    wrong[:, 0] = VOCAB.index["+"]
    np.testing.assert_array_equal(task.reward(prompts, wrong), np.zeros(16))
    no_eos = np.concatenate([right[:, :-1], right[:, :1]], 1)
    assert task.reward(prompts, no_eos).sum() == 0


def test_addition_answers_are_the_sums():
    task = Addition(n_digits=3)
    p = np.array([VOCAB.bos, *VOCAB.encode("047+395=")])
    assert VOCAB.decode(task.answer(p)) == "2440"  # 442, least significant digit first


def test_completions_are_padded_after_the_first_eos():
    eos, pad = VOCAB.eos, VOCAB.pad
    tokens = np.array([[5, eos, 7, eos], [5, 6, 7, 8]])
    logp = -np.ones((2, 4), np.float32)
    t, lp, mask = finish_completions(tokens, logp, eos, pad)
    np.testing.assert_array_equal(t, [[5, eos, pad, pad], [5, 6, 7, 8]])
    np.testing.assert_array_equal(lp, [[-1, -1, 0, 0], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 1, 1]])


def test_token_config_errors_name_the_field():
    cases = [({"generation.mode": "specter"}, "generation.mode"), ({"policy.type": "mlp"}, "policy.type"),
             ({"policy.lm.d_modle": 8}, "policy.lm.d_modle"), ({"draft.lm.n_heads": 3}, "draft.lm"),
             ({"algorithm.type": "appo"}, "algorithm.type"), ({"algorithm.type": "ppo"}, "policy.lm.value_head"),
             ({"workers.policies.count": 0}, "workers.policies.count"),
             ({"generation.temperature": 0}, "generation.temperature"),
             ({"algorithm.group_size": 0}, "algorithm.group_size")]
    for over, field in cases:
        with pytest.raises(ConfigError) as err:
            _tiny(**over)
        assert str(err.value).startswith(field) or f": {field}" in str(err.value), (over, str(err.value))
    with pytest.raises(ConfigError, match="env.kwargs"):
        build_task(_tiny(**{"env.kwargs": {"n_digit": 2}}))


def test_plan_wires_the_token_dataflow():
    plan = compile_plan(_tiny(**{"workers.policies.count": 2, "workers.actors.count": 3}))
    assert {w.role for w in plan.workers} == {"trainer", "generation", "draft", "token_actor"}
    assert plan.stream(PROMPTS).servers == ("generation/0", "generation/1")
    assert plan.stream(DRAFT_SAMPLES).clients_of("draft/0") == ("token_actor/0", "token_actor/1", "token_actor/2")
    assert plan.stream(DRAFT_PARAMS).server_of("generation/1") == "draft/0"
    plain = compile_plan(_tiny(**{"generation.mode": "plain"}))
    assert not plain.role("draft") and {s.name for s in plain.streams} == {"samples", "params", PROMPTS}


# --------------------------------------------------------------------------- GRPO math


def test_group_advantages_match_hand_computed_values():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 0.0], dtype=torch.float64)
    adv = group_advantages(r, 4)
    s1 = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1]
    s3 = math.sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3)  # of [3, 1, 2, 0], mean 1.5
    want = [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4), 0, 0, 0, 0,
            1.5 / (s3 + 1e-4), -0.5 / (s3 + 1e-4), 0.5 / (s3 + 1e-4), -1.5 / (s3 + 1e-4)]
    torch.testing.assert_close(adv, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(group_advantages(r, 1), torch.zeros_like(r))


def _hand_grpo(logp, old, adv, mask, clip, ref, beta):
    """GRPO written out with Python floats: per token, per sequence mean, mean over sequences."""
    total = 0.0
    for b in range(len(logp)):
        terms = []
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(logp[b][t] - old[b][t])
            surrogate = min(ratio * adv[b], min(max(ratio, 1 - clip), 1 + clip) * adv[b])
            d = ref[b][t] - logp[b][t]
            terms.append(-surrogate + beta * (math.exp(d) - d - 1))
        total += sum(terms) / max(len(terms), 1)
    return total / len(logp)


def test_grpo_loss_matches_hand_computed_values():
    g = torch.Generator().manual_seed(3)
    B, N, clip, beta = 6, 5, 0.2, 0.05
    logp = -torch.rand(B, N, generator=g, dtype=torch.float64) * 3
    old = logp + (torch.rand(B, N, generator=g, dtype=torch.float64) - 0.5) * 0.8  # ratios in and out of the clip
    ref = logp + (torch.rand(B, N, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, N, generator=g) < 0.7
    mask[:, 0] = True
    loss, pg, kl = grpo_loss(logp, old, adv, mask, clip, ref, beta)
    want = _hand_grpo(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), clip, ref.tolist(), beta)
    assert abs(loss.item() - want) < 1e-12
    assert abs(pg.item() - _hand_grpo(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), clip,
                                      logp.tolist(), 0.0)) < 1e-12
    torch.testing.assert_close(kl_k3(logp, ref), torch.exp(ref - logp) - (ref - logp) - 1)
    # the masked-out tokens do not count; a token-level mean would give another value (control)
    noisy = logp.masked_fill(~mask, 5.0)
    assert abs(grpo_loss(noisy, old, adv, mask, clip, ref, beta)[0].item() - want) < 1e-12
    per_token = (clipped_token_loss(logp, old, adv, clip) * mask).sum() / mask.sum()
    assert abs(per_token.item() - pg.item()) > 1e-6


def test_grpo_learner_gradient_matches_the_loss_on_its_batch():
    """One step of the learner equals one AdamW step on grpo_loss over the same batch."""
    cfg = _tiny(**{"algorithm.epochs": 1, "algorithm.kl_coef": 0.1})
    task = build_task(cfg)
    info = compile_info(cfg)
    torch.manual_seed(0)
    policy = LMPolicy(info, cfg.policy).double()
    twin = LMPolicy(info, cfg.policy).double()
    twin.load_state_dict(policy.state_dict())
    learner = GRPOLearner(policy, cfg.algorithm, cfg.optimizer, sampling=sampling_params(cfg))
    learner.optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    B, N = 16, 3
    prompts = torch.from_numpy(task.sample_prompts(2, np.random.default_rng(1))).repeat_interleave(8, 0)
    completion = torch.randint(0, task.vocab_size, (B, N))
    with torch.no_grad():
        old = learner.log_probs(twin, prompts, completion) - 0.1 * torch.rand(B, N, dtype=torch.float64)
    reward = torch.rand(B, dtype=torch.float64)
    mask = torch.ones(B, N, dtype=torch.bool)
    batch = {"prompt": prompts.T, "completion": completion.T, "logp": old.T, "mask": mask.T,
             "reward": reward[None], "version": torch.zeros(1, B, dtype=torch.long), "valid": mask[:1].T.T[:1]}
    ref = learner.log_probs(twin, prompts, completion).detach()
    stats = learner.train(batch)
    opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    logp = learner.log_probs(twin, prompts, completion)
    loss, _, _ = grpo_loss(logp, old.double(), group_advantages(reward, 8), mask, cfg.algorithm.clip, ref, 0.1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(twin.parameters(), cfg.algorithm.max_grad_norm)
    opt.step()
    for (name, a), b in zip(policy.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    assert stats["losses/logp_gap"] >= 0.09  # stream log-probs shifted on purpose: the gap sees it


def compile_info(cfg):
    from srl.envs.tokens import task_space

    return task_space(cfg, build_task(cfg))


# --------------------------------------------------------------------------- the policy's log-probs


def _generation_models(cfg):
    info = compile_info(cfg)
    torch.manual_seed(1)
    policy = LMPolicy(info, cfg.policy).eval()
    draft = build_draft(cfg, info.n_actions).eval()
    return policy, draft


def _stream_gap(recorded, policy_logp, mask):
    return float(((recorded - policy_logp).abs() * mask).max())


@pytest.mark.parametrize("mode", ["plain", "standard", "spectr"])
def test_generation_records_the_policys_log_probs_not_the_drafts(mode):
    cfg = _tiny(**{"generation.mode": mode, "generation.k": 3, "generation.max_new_tokens": 6,
                   "generation.temperature": 1.3, "generation.top_k": 12})
    task = build_task(cfg)
    policy, draft = _generation_models(cfg)
    prompts = torch.from_numpy(task.sample_prompts(16, np.random.default_rng(2)))
    sampler = make_sampler(cfg, policy, draft, 16, task.prompt_len, 6)
    tokens, logp, _ = generate(sampler, prompts, 6, task.eos_id, task.pad_id)
    tokens_t = torch.from_numpy(tokens)
    mask = torch.from_numpy(finish_completions(tokens, logp, task.eos_id, task.pad_id)[2])
    learner = GRPOLearner(policy, cfg.algorithm, cfg.optimizer, sampling=sampling_params(cfg))
    with torch.no_grad():
        policy_logp = learner.log_probs(policy, prompts, tokens_t)
        draft_logits = draft(torch.cat([prompts, tokens_t], 1)[:, :-1])[:, prompts.shape[1] - 1:]
        draft_logp = token_log_probs(draft_logits, tokens_t, sampling_params(cfg))
    assert _stream_gap(torch.from_numpy(logp), policy_logp, mask) < EXACT_ATOL
    # negative control: a stream that recorded the draft's log-probabilities fails the same check
    assert _stream_gap(draft_logp.float(), policy_logp, mask) > 100 * EXACT_ATOL


# --------------------------------------------------------------------------- the draft worker


def _sample_message(task, layout, actor, seq, rng, G=8):
    prompts = np.repeat(task.sample_prompts(2, rng), G, 0)
    completion = rng.integers(3, 13, (len(prompts), layout.new_tokens))
    arrays = {"prompt": prompts.T.copy(), "completion": completion.T.copy(),
              "logp": -np.ones(completion.T.shape, np.float32), "mask": np.ones(completion.T.shape, bool),
              "reward": np.zeros((1, len(prompts)), np.float32), "version": np.zeros((1, len(prompts)), np.int64),
              "valid": np.ones((1, len(prompts)), bool)}
    meta = {"version": 0, "actor": actor, "seq": seq, "incarnation": 0}
    msg = wire.decode(wire.encode("sample", arrays, meta))
    layout.check(msg)
    return msg


def test_draft_distiller_uses_every_sequence_exactly_once():
    cfg = _tiny(**{"workers.actors.count": 2})
    task, info = build_task(cfg), compile_info(cfg)
    layout = token_layout(cfg, info)
    policy, draft = _generation_models(cfg)
    aligner = DraftAligner(draft, policy, DraftAlignConfig(params=sampling_params(cfg)))
    seen: list[tuple] = []
    step = aligner.step
    aligner.step = lambda tokens, mask, update: (seen.extend(map(tuple, tokens.tolist())), step(tokens, mask, update))[1]
    distiller = DraftDistiller(aligner)
    rng = np.random.default_rng(5)
    msgs = [_sample_message(task, layout, a, s, rng) for s in range(4) for a in range(2)]
    sent = [tuple(row) for m in msgs for row in np.concatenate([m.arrays["prompt"], m.arrays["completion"]]).T.tolist()]
    for m in msgs + msgs[:3]:  # three replays
        distiller.consume(m)
    assert sorted(seen) == sorted(sent) and aligner.updates == len(msgs)
    assert distiller.duplicates == 3 and distiller.sequences == len(sent)


def test_draft_distiller_stops_updating_after_max_updates_and_keeps_measuring():
    cfg = _tiny()
    task, info = build_task(cfg), compile_info(cfg)
    layout = token_layout(cfg, info)
    rng = np.random.default_rng(6)
    msgs = [_sample_message(task, layout, 0, s, rng) for s in range(4)]
    weights = {}
    for limit in (2, None):  # None: the control, which keeps updating
        policy, draft = _generation_models(cfg)
        distiller = DraftDistiller(DraftAligner(draft, policy, DraftAlignConfig(params=sampling_params(cfg))),
                                   max_updates=limit)
        stats = [distiller.consume(m) for m in msgs[:2]]
        after_two = {k: v.clone() for k, v in draft.state_dict().items()}
        stats += [distiller.consume(m) for m in msgs[2:]]
        weights[limit] = (after_two, draft.state_dict())
        assert all(0.0 < s["charts/acceptance_rate"] <= 1.0 for s in stats)
        assert distiller.sequences == sum(m.arrays["valid"].size for m in msgs)
        assert distiller.aligner.updates == (2 if limit else 4) and distiller.frozen == bool(limit)
    for limit, (two, last) in weights.items():
        same = all(torch.equal(two[k], last[k]) for k in two)
        assert same == (limit is not None), limit


# --------------------------------------------------------------------------- live runs


def _rows(run_dir):
    return [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_rlhf_tiny_learns_through_the_dataflow(tmp_path):
    """Actors, generation worker (speculative), trainer (GRPO), draft worker and both parameter
    streams, until the mean reward of the last 128 completions clearly rises (random: ~0.06)."""
    cfg = _tiny(tmp_path, **{"stop.mean_return": 0.3, "stop.wall_s": 150})
    result = Experiment(cfg, run_dir=str(tmp_path / "run")).run()
    assert result.reason == "mean_return", result
    rows = _rows(result.run_dir)
    first = next(r["charts/episodic_return"] for r in rows if r.get("charts/episodic_return") is not None)
    assert first < 0.15 and result.mean_return > 0.2  # (completions reported after the stop move the window)
    last = rows[-1]
    assert 0 <= last["losses/logp_gap"] < EXACT_ATOL  # the stream carried the policy's log-probs
    assert last["draft/acceptance_rate"] > 0.3 and last["generation/tokens_per_pass"] > 1.0
    assert last["restarts"] == 0 and last["dropped_frames"] == 0, last


def test_kill_9_of_generation_and_draft_workers_and_the_run_finishes(tmp_path):
    cfg = _tiny(tmp_path, **{"stop.mean_return": 0.35, "stop.wall_s": 240})
    ctl = controller_for(cfg, str(tmp_path / "run"))
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("result", ctl.run()), daemon=True)
    th.start()
    try:
        _wait(lambda: ctl.counters["version"] >= 3)
        os.kill(ctl.scheduler.pid("generation/0"), signal.SIGKILL)
        _wait(lambda: ctl.restarts >= 1 and ctl.worker_stats.get("generation/0", {}).get("incarnation") == 1)
        v = ctl.counters["version"]
        _wait(lambda: ctl.counters["version"] >= v + 1)  # learning goes on with the new worker
        os.kill(ctl.scheduler.pid("draft/0"), signal.SIGKILL)
        _wait(lambda: ctl.restarts >= 2 and ctl.worker_stats.get("draft/0", {}).get("incarnation") == 1)
        th.join(timeout=240)
    finally:
        ctl.request_stop()
        th.join(timeout=60)
    result = box["result"]
    assert result.reason == "mean_return" and result.restarts == 2, result
    draft = ctl.worker_stats["draft/0"]
    assert draft["duplicates"] == 0 and draft["sequences"] > 0  # the new draft learned from fresh samples
    sent = ctl.worker_stats["token_actor/0"]["draft_sent"]
    assert draft["updates"] <= sent


def test_a_user_task_class_runs_from_python(tmp_path):
    class Echo:
        """Repeat the prompt's second token: reward 1 when the first completion token is it."""

        vocab_size, eos_id, pad_id = 8, 1, 0

        def sample_prompts(self, n, rng):
            return np.stack([np.full(n, 2), rng.integers(3, 8, n), np.full(n, 2)], 1).astype(np.int64)

        def reward(self, prompts, completions):
            return (completions[:, 0] == prompts[:, 1]).astype(float)

    cfg = _tiny(tmp_path, **{"generation.mode": "plain", "generation.max_new_tokens": 2, "stop.mean_return": "null",
                             "env.kwargs": "{}",
                             "stop.env_steps": 512, "stop.wall_s": 60})
    result = Experiment(cfg, run_dir=str(tmp_path / "run"), task=Echo).run()
    assert cfg.env.id == "custom/Echo-v0" and result.reason == "env_steps" and result.env_steps >= 512


def test_supervised_warm_up_lowers_the_loss_before_rl():
    from srl.algorithms.grpo import warm_up

    cfg = _tiny()
    task, info = build_task(cfg), compile_info(cfg)
    torch.manual_seed(0)
    policy = LMPolicy(info, cfg.policy)
    first = warm_up(policy, task, 1, 3e-3, "cpu", seed=0)
    last = warm_up(policy, task, 40, 3e-3, "cpu", seed=1)
    assert last < 0.6 * first
    with pytest.raises(ValueError, match="stream"):
        warm_up(policy, object(), 1, 1e-3, "cpu", seed=0)


def test_warm_up_cache_loads_the_same_weights_and_keys_on_the_settings(tmp_path):
    from srl.algorithms.grpo import warm_up

    cfg = _tiny()
    task, info = build_task(cfg), compile_info(cfg)

    def fresh():
        torch.manual_seed(0)
        return LMPolicy(info, cfg.policy)

    cache = str(tmp_path / "warm")
    trained = fresh()
    warm_up(trained, task, 5, 3e-3, "cpu", seed=0, batch=8, cache=cache)
    assert len(os.listdir(cache)) == 1
    loaded = fresh()
    assert math.isnan(warm_up(loaded, task, 5, 3e-3, "cpu", seed=0, batch=8, cache=cache))  # a hit: no training
    for (name, a), b in zip(trained.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert any((a != b).any() for a, b in zip(trained.state_dict().values(), fresh().state_dict().values()))
    for other in (dict(steps=4), dict(lr=1e-3), dict(seed=1), dict(batch=4), dict(target=0.99)):  # each a new key
        kw = dict(dict(steps=5, lr=3e-3, seed=0, batch=8, target=None), **other)
        assert not math.isnan(warm_up(fresh(), task, kw["steps"], kw["lr"], "cpu", seed=kw["seed"],
                                      batch=kw["batch"], cache=cache, target=kw["target"]))
    assert len(os.listdir(cache)) == 6


class _Spell(torch.nn.Module):
    """Logits that spell ``tokens[i]`` (one row per prompt) after the prompt, whatever was generated."""

    def __init__(self, tokens: np.ndarray, prompt_len: int, vocab: int):
        super().__init__()
        self.tokens, self.prompt_len, self.vocab, self.modes = torch.as_tensor(tokens), prompt_len, vocab, []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        logits = torch.zeros(*ids.shape, self.vocab)
        k = ids.shape[1] - self.prompt_len  # tokens generated so far
        logits[:, -1].scatter_(1, self.tokens[:, k:k + 1], 1.0)
        return logits


def test_warmup_greedy_exact_match_scores_spelled_answers():
    from srl.algorithms.grpo import greedy_exact_match

    task = Addition(n_digits=2)
    prompts = task.sample_prompts(8, np.random.default_rng(0))
    right = np.array([task.answer(p) + [task.eos_id] for p in prompts])
    junk = np.full((8, 2), VOCAB.index["7"])  # after the eos: padded away, not graded
    wrong = right.copy()
    wrong[:, 0] = VOCAB.index["+"]
    half = np.where(np.arange(8)[:, None] % 2 == 0, right, wrong)
    for spelled, expected in ((right, 1.0), (wrong, 0.0), (half, 0.5)):
        stub = _Spell(np.concatenate([spelled, junk], 1), prompts.shape[1], task.vocab_size).train()
        assert greedy_exact_match(stub, task, prompts, task.answer_len + 2, "cpu") == expected
        assert stub.training and stub.modes == [False] * (task.answer_len + 2)  # eval while decoding, then restored


class _Graded:
    """The tiny task's problems, every completion scored ``score`` (a stand-in accuracy)."""

    def __init__(self, task, score: float):
        self.task, self.score = task, score
        self.answer_len, self.eos_id, self.pad_id = task.answer_len, task.eos_id, task.pad_id

    def stream(self, *args):
        return self.task.stream(*args)

    def sample_prompts(self, n, rng):
        return self.task.sample_prompts(n, rng)

    def reward(self, prompts, completions):
        return np.full(len(prompts), self.score)


def test_warm_up_with_a_target_stops_at_the_first_check_that_reaches_it(monkeypatch, caplog):
    from srl.algorithms import grpo

    monkeypatch.setattr(grpo, "WARMUP_CHECK_EVERY", 3)
    cfg = _tiny()
    task, info = build_task(cfg), compile_info(cfg)
    for score, target, ran in ((1.0, 0.5, 3), (0.5, 0.5, 3), (0.0, 0.5, 10), (0.0, None, 10)):
        torch.manual_seed(0)
        steps = []
        with caplog.at_level("INFO", logger=grpo.__name__):
            caplog.clear()
            grpo.warm_up(LMPolicy(info, cfg.policy), _Graded(task, score), 10, 3e-3, "cpu", seed=0, batch=8,
                         callback=lambda step, loss: steps.append(step), target=target)
        assert steps == list(range(1, ran + 1)), (score, target)
        said = " ".join(r.getMessage() for r in caplog.records)
        assert ("step 3" in said) if ran == 3 else ("cap of 10" in said) if target else not said
    no_answer_len = _Graded(task, 1.0)
    del no_answer_len.answer_len
    with pytest.raises(ValueError, match="algorithm.warmup_target needs a task with answer_len"):
        grpo.warm_up(LMPolicy(info, cfg.policy), no_answer_len, 10, 3e-3, "cpu", seed=0, target=0.5)


def test_warmup_target_out_of_range_is_refused_naming_the_field():
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="algorithm.warmup_target"):
            _tiny(**{"algorithm.warmup_target": bad})
    assert _tiny(**{"algorithm.warmup_target": 1.0}).algorithm.warmup_target == 1.0


def test_rlhf_addition_config_validates_at_gpu_size():
    from srl.config import load_experiment
    from srl.policies.lm import TransformerLM
    from srl.policies.lm_policy import lm_config

    cfg = load_experiment(os.path.join(ROOT, "configs", "rlhf_addition.yaml"))
    plan = compile_plan(cfg)
    assert cfg.generation.mode == "spectr" and cfg.algorithm.type == "grpo" and plan.role("draft")
    with torch.device("meta"):
        n = sum(p.numel() for p in TransformerLM(lm_config(16, cfg.policy.lm)).parameters())
    assert 80e6 < n < 120e6


def test_bf16_autocast_is_cuda_only_and_sampling_copies_follow_it():
    from srl.policies.lm_policy import sampling_dtype

    fp32, bf16 = _tiny(), _tiny(**{"policy.autocast": "bf16"})
    assert sampling_dtype(bf16.policy, "cuda") == torch.bfloat16
    assert sampling_dtype(bf16.policy, "cuda:0") == torch.bfloat16
    assert sampling_dtype(bf16.policy, "cpu") == torch.float32
    assert sampling_dtype(fp32.policy, "cuda") == torch.float32
    info = compile_info(bf16)
    torch.manual_seed(3)
    policy = LMPolicy(info, bf16.policy)
    twin = LMPolicy(info, fp32.policy)
    twin.load_state_dict(policy.state_dict())
    prompts = torch.from_numpy(build_task(bf16).sample_prompts(4, np.random.default_rng(0)))
    completion = torch.randint(0, info.n_actions, (4, 5))
    got, want = policy.completion_logits(prompts, completion), twin.completion_logits(prompts, completion)
    assert got.dtype == torch.float32 and torch.equal(got, want)  # CPU: autocast does not apply


@pytest.mark.gpu
def test_bf16_autocast_learner_log_probs_track_a_bfloat16_sampling_copy():
    """On CUDA the learner's bf16-autocast log-probabilities and a bfloat16 copy's agree to bf16
    round-off, and both differ from float32 by more than that (the autocast is really on)."""
    cfg = _tiny(**{"policy.autocast": "bf16"})
    info = compile_info(cfg)
    torch.manual_seed(4)
    policy = LMPolicy(info, cfg.policy).cuda()
    copy_ = LMPolicy(info, cfg.policy).cuda().to(torch.bfloat16)
    copy_.load_state_dict(policy.state_dict())
    prompts = torch.from_numpy(build_task(cfg).sample_prompts(32, np.random.default_rng(1))).cuda()
    completion = torch.randint(0, info.n_actions, (32, 6), device="cuda")
    params = sampling_params(cfg)
    with torch.no_grad():
        amp = token_log_probs(policy.completion_logits(prompts, completion), completion, params)
        policy.bf16 = False
        exact = token_log_probs(policy.completion_logits(prompts, completion), completion, params)
        low = token_log_probs(copy_.completion_logits(prompts, completion), completion, params)
    assert float((amp - low).abs().max()) < 0.05
    assert float((amp - exact).abs().max()) > 1e-4


def test_grpo_with_sophia_refreshes_its_hessian():
    cfg = _tiny(**{"optimizer.type": "sophia", "optimizer.kwargs": "{update_period: 1}"})
    task, info = build_task(cfg), compile_info(cfg)
    torch.manual_seed(0)
    policy = LMPolicy(info, cfg.policy)
    learner = GRPOLearner(policy, cfg.algorithm, cfg.optimizer, sampling=sampling_params(cfg), task=task)
    B = 16
    prompts = torch.from_numpy(task.sample_prompts(2, np.random.default_rng(0))).repeat_interleave(8, 0)
    completion = torch.randint(0, task.vocab_size, (B, 3))
    with torch.no_grad():
        old = learner.log_probs(policy, prompts, completion)
    batch = {"prompt": prompts.T, "completion": completion.T, "logp": old.T, "mask": torch.ones(3, B, dtype=torch.bool),
             "reward": torch.rand(1, B), "version": torch.zeros(1, B, dtype=torch.long),
             "valid": torch.ones(1, B, dtype=torch.bool)}
    before = [p.detach().clone() for p in policy.parameters()]
    stats = learner.train(batch)
    assert stats["losses/logp_gap"] < EXACT_ATOL and "losses/sophia_win_rate" in stats
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    hess = [learner.optimizer.state[p].get("hessian") for p in policy.parameters()]
    assert any(h is not None and float(h.abs().sum()) > 0 for h in hess)


def test_published_weights_are_a_snapshot_not_the_live_parameters():
    """The parameter stream sends without copying; weights that aliased the parameters changed
    under it with the next optimizer step (seen as frames failing their HMAC in live runs). The
    trainer publishes its live CPU tensors: the server keeps a copy."""
    from srl.streams.params import ParamServer

    layer = torch.nn.Linear(3, 2)
    server = ParamServer(shared=False)
    try:
        server.publish(0, layer.state_dict())
        with torch.no_grad():
            layer.weight.add_(1.0)
        assert not np.allclose(server._wire_arrays()["weight"], layer.weight.detach().numpy())
    finally:
        server.close()


def test_the_draft_is_warmed_up_like_the_policy_and_alike_in_every_worker():
    """With algorithm.warmup_steps the draft starts from the task (so a draft never aligned,
    draft.align: false, starts near the policy and then falls behind it), and the generation and
    draft workers, each building its own, get the same weights."""
    import torch.nn.functional as F

    cold = build_draft(_tiny(), VOCAB.__len__())
    warm_a = build_draft(_tiny(**{"algorithm.warmup_steps": 30, "algorithm.warmup_lr": 3e-3}), len(VOCAB))
    warm_b = build_draft(_tiny(**{"algorithm.warmup_steps": 30, "algorithm.warmup_lr": 3e-3}), len(VOCAB))
    for (name, a), b in zip(warm_a.state_dict().items(), warm_b.state_dict().values()):
        assert torch.equal(a, b), name
    task = build_task(_tiny())
    ids = torch.as_tensor(task.stream(32, 33, np.random.default_rng(5)))
    answers = task.answer_targets(ids).reshape(-1)  # what the warm-up learns

    def loss(model):
        with torch.no_grad():
            logits = model(ids[:, :-1])
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return float(per_token[answers].mean())

    assert loss(warm_a) < 0.7 * loss(cold)
    # draft.warmup_steps / warmup_lr replace the policy's settings for the draft alone
    own = build_draft(_tiny(**{"algorithm.warmup_steps": 30, "algorithm.warmup_lr": 3e-3,
                               "draft.warmup_steps": 0}), len(VOCAB))
    for (name, a), b in zip(own.state_dict().items(), cold.state_dict().values()):
        assert torch.equal(a, b), name
    longer = build_draft(_tiny(**{"draft.warmup_steps": 60, "draft.warmup_lr": 3e-3}), len(VOCAB))
    assert loss(longer) < loss(warm_a)


def test_rlhf_benchmark_step_time_and_generation_share_from_metrics(tmp_path):
    """benchmarks/rlhf.py: time per RL step is the median of the steady intervals between
    versions, the generation share the slope of the worker's busy seconds over the wall time."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rlhf_bench", os.path.join(ROOT, "benchmarks", "rlhf.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(3)
    step_s, share = rng.uniform(0.1, 0.5), rng.uniform(0.2, 0.9)
    rows = [{"wall_s": 5.0, "version": 0}]  # start-up: no version yet, no generation
    for i in range(1, 41):
        t = 5.0 + i * 2.0
        rows.append({"wall_s": t, "version": int((t - 5.0) / step_s), "generation/busy_s": share * (t - 5.0),
                     "perf/train_s": 0.05})
    rows[2]["version"] = rows[1]["version"]  # one stale reading: the median ignores its odd intervals
    with open(tmp_path / "metrics.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    s = bench.summarize(str(tmp_path))
    assert s["rl_step_s"] == pytest.approx(step_s, rel=0.05)
    assert s["generation_busy_share"] == pytest.approx(share, rel=1e-9)
    assert s["train_s"] == 0.05 and s["versions"] == rows[-1]["version"] and len(s["curve"]) == len(rows)


def test_grpo_learner_skips_a_non_finite_minibatch_and_counts_it():
    cfg = _tiny(**{"algorithm.epochs": 1, "algorithm.minibatches": 2, "algorithm.kl_coef": 0.0})
    task = build_task(cfg)
    torch.manual_seed(0)
    policy = LMPolicy(compile_info(cfg), cfg.policy)
    learner = GRPOLearner(policy, cfg.algorithm, cfg.optimizer, sampling=sampling_params(cfg))
    B, N = 16, 3
    prompts = torch.from_numpy(task.sample_prompts(2, np.random.default_rng(1))).repeat_interleave(8, 0)
    completion = torch.randint(0, task.vocab_size, (B, N))
    mask = torch.ones(B, N, dtype=torch.bool)

    def batch(reward):
        with torch.no_grad():
            old = learner.log_probs(policy, prompts, completion)
        return {"prompt": prompts.T, "completion": completion.T, "logp": old.T, "mask": mask.T,
                "reward": reward[None], "version": torch.ones(1, B, dtype=torch.long)}

    before = [p.detach().clone() for p in policy.parameters()]
    stats = learner.train(batch(torch.full((B,), float("nan"))))  # every advantage is NaN
    assert stats["losses/skipped_steps"] == 2 and learner.skipped_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    learner.train(batch(torch.rand(B)))
    assert learner.skipped_steps == 2
    assert not all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_workers_warming_up_longer_than_the_heartbeat_timeout_start(tmp_path, monkeypatch):
    """A draft warm-up longer than workers.heartbeat_timeout_s: the generation and draft workers
    say "starting" meanwhile, so the run starts and learns without a restart. Negative control:
    without those messages the same run fails to start."""
    from srl.errors import SrlError
    from srl.system import worker as worker_module

    over = {"workers.heartbeat_s": 0.3, "workers.heartbeat_timeout_s": 2.0, "draft.warmup_steps": 800,
            "draft.warmup_lr": 3e-3, "stop.mean_return": "null", "stop.wall_s": 600}
    ctl = controller_for(_tiny(tmp_path / "a", **over), str(tmp_path / "a" / "run"))
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("result", ctl.run()), daemon=True)
    th.start()
    try:
        _wait(lambda: ctl.counters["version"] >= 2 or not th.is_alive(), timeout_s=300)
    finally:
        ctl.request_stop()
        th.join(timeout=60)
    assert ctl.counters["version"] >= 2 and box["result"].restarts == 0, box.get("result")
    monkeypatch.setattr(worker_module, "MAX_CONFIGURE_S", 0.0)  # forked workers inherit it
    with pytest.raises(SrlError, match="failed to start|silent"):
        Experiment(_tiny(tmp_path / "b", **{**over, "stop.wall_s": 60}), run_dir=str(tmp_path / "b" / "run")).run()

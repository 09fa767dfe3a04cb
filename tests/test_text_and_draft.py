"""Token tasks (rewards, formats, learnability) and draft alignment raising acceptance."""

import numpy as np
import torch

from srl.envs.text import VOCAB, AdditionTask, MixedTask, SortTask
from srl.generation.decode import PlainSampler
from srl.generation.draft import (DraftAlignConfig, DraftAligner, block_efficiency,
                                  measure_acceptance, policy_batches)
from srl.generation.sampling import SamplingParams
from srl.policies.lm import LMConfig, TransformerLM


def test_addition_task_rewards():
    task = AdditionTask(n_digits=3)
    prompts, answers = task.sample(64, np.random.default_rng(0))
    assert prompts.shape == (64, 9) and answers.shape == (64, 4)
    p = prompts[0].tolist()
    a = int("".join(VOCAB.SYMBOLS[i] for i in p[1:4]))
    b = int("".join(VOCAB.SYMBOLS[i] for i in p[5:8]))
    assert "".join(VOCAB.SYMBOLS[i] for i in answers[0].tolist())[::-1] == f"{a + b:04d}"
    eos = torch.tensor([VOCAB.eos])
    assert task.reward(answers[0], torch.cat([answers[0], eos, answers[0]])) == 1.0
    assert task.reward(answers[0], answers[0]) == 1.0  # cut at the answer length
    wrong = answers[0].clone()
    wrong[1] = VOCAB.digit0 + (wrong[1] - VOCAB.digit0 + 1) % 10
    assert task.reward(answers[0], torch.cat([wrong, eos])) == 0.0
    assert task.reward(answers[0], torch.cat([answers[0], answers[0][:1]])) == 0.0  # no eos
    assert AdditionTask(partial=True).reward(answers[0], torch.cat([wrong, eos])) == 0.75
    r = task.rewards(answers, torch.cat([answers, eos.expand(64, 1)], 1))
    assert r.shape == (64,) and (r == 1).all()


def test_sort_task_and_stream():
    task = SortTask(length=5)
    prompts, answers = task.sample(8, np.random.default_rng(1))
    for p, a in zip(prompts.tolist(), answers.tolist()):
        assert sorted(p[2:-1]) == a
    s = MixedTask().stream(4, 50, np.random.default_rng(2))
    assert s.shape == (4, 50) and s.max() < len(VOCAB)


def test_small_lm_learns_the_task_format():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    task = SortTask(length=4)
    model = TransformerLM(LMConfig(vocab_size=len(VOCAB), d_model=32, n_layers=2, n_heads=4, max_seq_len=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        x = task.stream(16, 24, rng)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, len(VOCAB)), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # random digits cost ln(10) each; a model that learned the format and sorting is well under
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:3])


def test_draft_alignment_raises_acceptance():
    torch.manual_seed(1)
    vocab = 12
    target = TransformerLM(LMConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.3))
    draft = TransformerLM(LMConfig(vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, max_seq_len=64, init_std=0.3))
    params = SamplingParams(temperature=1.0)
    sampler = PlainSampler(target, 32, 40, params, cuda_graph=False)

    def fresh():
        prompt = torch.randint(0, vocab, (32, 2))
        with torch.no_grad():
            return torch.cat([prompt, sampler.generate(prompt, 16).tokens], 1)

    held_out = fresh()
    before = measure_acceptance(draft, target, held_out)
    aligner = DraftAligner(draft, target, DraftAlignConfig(lr=3e-3, params=params))
    history = aligner.run(policy_batches(fresh, 25))
    after = measure_acceptance(draft, target, held_out)
    assert after > before + 0.05
    assert aligner.samples_seen == 25 * 32 and len(history) == 25
    assert history[-1]["charts/acceptance_rate"] > history[0]["charts/acceptance_rate"]
    assert abs(block_efficiency(0.5, 3) - 1.875) < 1e-12 and block_efficiency(1.0, 3) == 4.0


def test_answer_targets_mark_answers_and_eos_only():
    task = AdditionTask(n_digits=2)
    rng = np.random.default_rng(7)
    ids = task.stream(6, 40, rng)
    mask = task.answer_targets(ids)
    assert mask.shape == (6, 39) and mask.dtype == torch.bool
    eq, eos = VOCAB.index["="], VOCAB.eos
    for row, m in zip(ids.tolist(), mask.tolist()):
        expected, inside = [], False
        for prev in row[:-1]:  # a plain scan: is the target after `prev` inside an answer?
            if prev == eq:
                inside = True
            elif prev == eos:
                inside = False
            expected.append(inside)
        assert m == expected
        targets = [t for t, keep in zip(row[1:], m) if keep]
        # answers are digits closed by eos: 3 digits then eos for two-digit addition
        assert set(targets) <= set(VOCAB.digits(range(10))) | {eos}
        assert 0 < sum(m) < len(m)  # negative control: neither everything nor nothing
    # a prompt digit is never a target: the token after '<bos>' is a first operand digit
    for r, row in enumerate(ids.tolist()):
        for i in range(len(row) - 1):
            if row[i] == VOCAB.bos:
                assert not mask[r, i]


def test_addition_stream_teaches_every_operand_length_and_prompts_stay_full_width():
    from srl.envs.text import Addition

    task = AdditionTask(n_digits=3)
    rng = np.random.default_rng(11)

    def operands(prompt):
        digits = [t - VOCAB.digit0 for t in prompt]
        return int("".join(map(str, digits[1:4]))), int("".join(map(str, digits[5:8])))

    lengths = []
    for _ in range(3000):
        prompt, answer = task.stream_problem(rng)
        assert len(prompt) == 9 and len(answer) == 4  # one format, zero padded
        a, b = operands(prompt)
        assert answer == VOCAB.encode(f"{a + b:04d}"[::-1])
        lengths.append(len(str(max(a, b, 1))))
    share = np.bincount(lengths, minlength=4)[1:] / len(lengths)
    # operands drawn below 10, 100 or 1000 equally often: the largest of two has 1 digit in about
    # 1/3 * (1 + 0.01 + 0.0001), 2 digits in about 1/3 * (0.99 + 0.0099), 3 digits in about 1/3 * 0.99
    np.testing.assert_allclose(share, [0.337, 0.333, 0.330], atol=0.03)
    # the prompts RL draws stay full width: both operands below 100 in about 1% (negative control)
    prompts = Addition(n_digits=3).sample_prompts(3000, rng)
    small = np.mean([max(operands(p.tolist())) < 100 for p in prompts])
    assert small < 0.03

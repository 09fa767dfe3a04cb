"""Verifiable-reward token tasks for language-model policies, data generated in code.

A task hands out prompts (fixed length per task, so rows batch without padding) and scores
completions with an exact check. Both tasks share one small character vocabulary:

- ``AdditionTask``: ``<bos> 0 4 7 + 3 9 5 =`` -> ``2 4 4 <eos>`` (a + b, digits least
  significant first so each answer digit depends only on digits already seen plus a carry).
- ``SortTask``: ``<bos> S 3 1 4 1 5 =`` -> ``1 1 3 4 5 <eos>``.

``reward`` is 1.0 for the exact answer followed by ``<eos>`` (or by nothing when the
completion was cut at the answer's length), else 0.0; ``partial=True`` gives the fraction of answer
digits in place instead. ``stream`` packs solved problems back to back for pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


class Vocab:
    """Character vocabulary: pad, bos, eos, digits, '+', '=', 'S'."""

    SYMBOLS = ["<pad>", "<bos>", "<eos>", *"0123456789", "+", "=", "S"]

    def __init__(self):
        self.index = {s: i for i, s in enumerate(self.SYMBOLS)}
        self.pad, self.bos, self.eos = 0, 1, 2
        self.digit0 = self.index["0"]

    def __len__(self) -> int:
        return len(self.SYMBOLS)

    def encode(self, text: list[str] | str) -> list[int]:
        return [self.index[s] for s in (list(text) if isinstance(text, str) else text)]

    def decode(self, ids) -> str:
        return "".join(self.SYMBOLS[int(i)] if len(self.SYMBOLS[int(i)]) == 1
                       else f" {self.SYMBOLS[int(i)]} " for i in ids)

    def digits(self, values) -> list[int]:
        return [self.digit0 + int(v) for v in values]


VOCAB = Vocab()


@dataclass
class TextTask:
    """Base class: ``problem(rng) -> (prompt ids, answer ids)``; the rest is shared."""

    partial: bool = False
    """Score the fraction of answer tokens in place instead of all-or-nothing."""

    vocab = VOCAB

    def problem(self, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    @property
    def answer_len(self) -> int:
        raise NotImplementedError

    def sample(self, n: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """(prompts (n, prompt_len), answers (n, answer_len)) as int64 tensors."""
        pairs = [self.problem(rng) for _ in range(n)]
        return (torch.tensor([p for p, _ in pairs], dtype=torch.long),
                torch.tensor([a for _, a in pairs], dtype=torch.long))

    def reward(self, answer: Tensor, completion: Tensor) -> float:
        """Score one completion (any length) against the answer ids."""
        a = answer.tolist()
        c = completion.tolist()[: len(a) + 1]
        if self.partial:
            return sum(x == y for x, y in zip(a, c)) / len(a)
        ok = c[: len(a)] == a and (len(c) == len(a) or c[len(a)] == self.vocab.eos)
        return float(ok)

    def rewards(self, answers: Tensor, completions: Tensor) -> Tensor:
        return torch.tensor([self.reward(a, c) for a, c in zip(answers, completions)])

    def stream(self, batch: int, seq_len: int, rng: np.random.Generator) -> Tensor:
        """(batch, seq_len) windows of solved problems packed back to back."""
        rows = []
        for _ in range(batch):
            ids: list[int] = []
            while len(ids) < seq_len + 1:
                p, a = self.problem(rng)
                ids += p + a + [self.vocab.eos]
            start = int(rng.integers(0, len(ids) - seq_len))
            rows.append(ids[start:start + seq_len])
        return torch.tensor(rows, dtype=torch.long)


@dataclass
class AdditionTask(TextTask):
    """a + b with ``n_digits`` digits each (zero padded), answer least significant digit first."""

    n_digits: int = 3

    @property
    def answer_len(self) -> int:
        return self.n_digits + 1

    def problem(self, rng):
        a, b = (int(x) for x in rng.integers(0, 10 ** self.n_digits, size=2))
        fmt = f"{{:0{self.n_digits}d}}"
        prompt = [VOCAB.bos, *VOCAB.encode(fmt.format(a)), VOCAB.index["+"],
                  *VOCAB.encode(fmt.format(b)), VOCAB.index["="]]
        answer = VOCAB.encode(f"{{:0{self.n_digits + 1}d}}".format(a + b)[::-1])
        return prompt, answer


@dataclass
class SortTask(TextTask):
    """Sort ``length`` random digits ascending."""

    length: int = 6

    @property
    def answer_len(self) -> int:
        return self.length

    def problem(self, rng):
        xs = rng.integers(0, 10, size=self.length)
        prompt = [VOCAB.bos, VOCAB.index["S"], *VOCAB.digits(xs), VOCAB.index["="]]
        return prompt, VOCAB.digits(np.sort(xs))


@dataclass
class MixedTask(TextTask):
    """Addition and sorting interleaved in the packed stream (prompts come from ``addition``)."""

    addition: AdditionTask = None
    sort: SortTask = None

    def __post_init__(self):
        self.addition = self.addition or AdditionTask()
        self.sort = self.sort or SortTask()

    @property
    def answer_len(self) -> int:
        return self.addition.answer_len

    def problem(self, rng):
        return (self.addition if rng.random() < 0.5 else self.sort).problem(rng)

    def sample(self, n, rng):
        return self.addition.sample(n, rng)

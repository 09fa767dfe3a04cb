"""The sample layout of a token task run: prompts, completions and the policy's log-probs.

Time-major like every srl sample, so batches concatenate along the column axis: ``prompt``
(P, B) and ``completion`` (N, B) int64 token ids, ``logp`` (N, B) float32 (the policy's
log-probability of each generated token, 0 after the first eos), ``mask`` (N, B) bool (tokens up
to and including the first eos), ``reward`` (1, B) float32, ``version`` (1, B) int64 and
``valid`` (1, B) bool. B is a multiple of the group size G: each prompt's G completions sit side
by side. Checked on arrival (trainer and draft worker): a bad message is a counted drop.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from srl.system.wire import Message, WireError
from srl.workers.layout import check_sample_header

MAX_COLUMNS = 1 << 20


@dataclass(frozen=True)
class TokenLayout:
    prompt_len: int
    new_tokens: int
    vocab_size: int
    group_size: int
    actors: int

    @property
    def arrays(self) -> dict[str, tuple[int, str]]:
        """name -> (rows, dtype)."""
        return {"prompt": (self.prompt_len, "int64"), "completion": (self.new_tokens, "int64"),
                "logp": (self.new_tokens, "float32"), "mask": (self.new_tokens, "bool"),
                "reward": (1, "float32"), "version": (1, "int64"), "valid": (1, "bool")}

    def check(self, msg: Message) -> None:
        """WireError naming the first thing wrong with a sample message."""
        check_sample_header(msg, self.actors, self.arrays)
        B = msg.arrays["valid"].shape[-1] if msg.arrays["valid"].ndim == 2 else -1
        if not 0 < B <= MAX_COLUMNS or B % self.group_size:
            raise WireError(f"sample with {B} completions, expected a multiple of the group size {self.group_size}")
        for name, (rows, dtype) in self.arrays.items():
            arr = msg.arrays[name]
            if arr.shape != (rows, B) or arr.dtype != np.dtype(dtype):
                raise WireError(f"sample {name!r}: {arr.dtype}{arr.shape}, expected {dtype}{(rows, B)}")
        for name in ("prompt", "completion"):
            a = msg.arrays[name]
            if a.min() < 0 or a.max() >= self.vocab_size:
                raise WireError(f"sample {name!r} holds token ids outside [0, {self.vocab_size})")
        for name in ("logp", "reward"):
            if not np.isfinite(msg.arrays[name]).all():
                raise WireError(f"sample {name!r} holds non-finite values")
        if msg.arrays["logp"].max() > 1e-3:
            raise WireError("sample 'logp' holds log-probabilities above 0")
        if (msg.arrays["version"] != msg.meta["version"]).any():
            raise WireError("sample 'version' differs from its metadata")


def token_layout(cfg, info) -> TokenLayout:
    """The layout of ``cfg``'s samples (``info``: the task's spaces, prompts as observations)."""
    from srl.envs.tokens import build_task, max_new_tokens

    return TokenLayout(int(info.obs_shape[0]), max_new_tokens(cfg, build_task(cfg)), int(info.n_actions),
                       cfg.algorithm.group_size, cfg.workers.actors.count)

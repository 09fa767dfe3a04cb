"""CATS calibration: per-layer thresholds on |SiLU(gate)| for a target sparsity.

CATS (arXiv 2404.08763) picks, per layer, t = min{t' : F(t') >= s} where F is the empirical CDF
of |SiLU(x W_gate)| over calibration data and s the target sparsity. Here the policy runs on
task prompts (its own sampled completions appended, the text it will meet at generation), every
layer's |SiLU(gate)| goes into a histogram with log-spaced bins (1e-6 .. 1e3, 20,000 bins: a bin
is 0.1% wide, so the threshold needs no range guessed in advance), and t is the upper edge of
the bin where the CDF reaches s.

Thresholds live beside the checkpoint in ``cats_thresholds.json`` ({sparsity: [t per layer]});
a model whose config says ``mlp: {cats: {sparsity: s}}`` gets them at load (:func:`load_lm`), and
the samplers refuse a model that asks for CATS without thresholds (:func:`require_cats`).

Language-model runs keep their ``LMConfig`` as ``lm_config.json`` in the checkpoint folder
(:func:`save_lm_checkpoint`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from srl.policies.lm import LMConfig, TransformerLM, gated_mlps, require_cats  # noqa: F401 - require_cats public here too
from srl.system.checkpoint import checkpoint_root, load_latest, save_checkpoint

THRESHOLDS_FILE = "cats_thresholds.json"
LM_CONFIG_FILE = "lm_config.json"
_LOG_LO, _LOG_HI = -6.0, 3.0  # histogram range of |SiLU(gate)|, log10


class ActivationHistogram:
    """Counts of |a| over log-spaced bins; values outside the range land in the end bins."""

    def __init__(self, bins: int = 20000):
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.edges = torch.logspace(_LOG_LO, _LOG_HI, bins + 1, dtype=torch.float64)

    def add(self, values: Tensor) -> None:
        logs = values.detach().float().abs().clamp_min(1e-30).log10().flatten()
        pos = ((logs - _LOG_LO) / (_LOG_HI - _LOG_LO) * self.bins).floor().clamp(0, self.bins - 1)
        self.counts += torch.bincount(pos.long(), minlength=self.bins).double().cpu()

    def threshold(self, sparsity: float) -> float:
        """Smallest bin edge t with F(t) >= sparsity (0 for sparsity 0: keep every activation)."""
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if sparsity == 0.0 or self.counts.sum() == 0:
            return 0.0
        cdf = self.counts.cumsum(0) / self.counts.sum()
        b = int(torch.searchsorted(cdf, torch.tensor([sparsity], dtype=torch.float64))[0])
        return float(self.edges[min(b, self.bins - 1) + 1])


def _gate_hooks(model: TransformerLM, fn) -> list:
    """Call fn(layer, |SiLU(gate)|) on every gated MLP's gate output; returns the hook handles."""
    return [m.gate.register_forward_hook(lambda mod, inp, out, i=i: fn(i, F.silu(out).abs()))
            for i, m in enumerate(gated_mlps(model))]


class _DenseMLPs:
    """Context: CATS off while calibrating (thresholds are set on the dense activations)."""

    def __init__(self, model: TransformerLM):
        self.model, self.mlps = model, gated_mlps(model)

    def __enter__(self):
        self.model.cats_calibrating = True  # require_cats lets the samplers run it dense
        self.saved = [m.cats_threshold for m in self.mlps]
        for m in self.mlps:
            m.cats_threshold = None

    def __exit__(self, *exc):
        self.model.cats_calibrating = False
        for m, t in zip(self.mlps, self.saved):
            m.cats_threshold = t


@torch.no_grad()
def collect_histograms(model: TransformerLM, batches: Iterable[Tensor], bins: int = 20000
                       ) -> list[ActivationHistogram]:
    """One histogram of |SiLU(gate)| per layer over every position of the token ``batches`` (B, T)."""
    hists = [ActivationHistogram(bins) for _ in gated_mlps(model)]
    handles = _gate_hooks(model, lambda i, a: hists[i].add(a))
    try:
        with _DenseMLPs(model):
            for tokens in batches:
                model(tokens)
    finally:
        for h in handles:
            h.remove()
    return hists


def calibrate_cats(model: TransformerLM, batches: Iterable[Tensor], sparsity: float,
                   bins: int = 20000) -> list[float]:
    """Per-layer CATS thresholds for ``sparsity`` from the model's activations on ``batches``."""
    return [h.threshold(sparsity) for h in collect_histograms(model, batches, bins)]


@torch.no_grad()
def measure_sparsity(model: TransformerLM, batches: Iterable[Tensor], thresholds: list[float]
                     ) -> list[float]:
    """Fraction of |SiLU(gate)| <= threshold per layer on ``batches`` (dense forward)."""
    zero = [0.0] * len(thresholds)
    total = [0] * len(thresholds)

    def count(i, a):
        zero[i] += float((a <= thresholds[i]).sum())
        total[i] += a.numel()

    handles = _gate_hooks(model, count)
    try:
        with _DenseMLPs(model):
            for tokens in batches:
                model(tokens)
    finally:
        for h in handles:
            h.remove()
    return [z / max(n, 1) for z, n in zip(zero, total)]


def apply_cats(model: TransformerLM, thresholds: list[float] | None) -> None:
    """Set (None: clear) every layer's CATS threshold; stores down projections transposed."""
    mlps = gated_mlps(model)
    if thresholds is not None and len(thresholds) != len(mlps):
        raise ValueError(f"thresholds has {len(thresholds)} entries for {len(mlps)} gated layers")
    for i, m in enumerate(mlps):
        m.enable_cats(None if thresholds is None else thresholds[i])


# --------------------------------------------------------------------------- calibration data

@torch.no_grad()
def task_batches(model: TransformerLM, task, samples: int, batch: int, rng: np.random.Generator,
                 new_tokens: int | None = None, temperature: float = 1.0) -> list[Tensor]:
    """Task prompts with the model's own sampled completions: (batch, T) token tensors."""
    from srl.generation.decode import PlainSampler
    from srl.generation.sampling import SamplingParams

    dev = next(model.parameters()).device
    new_tokens = new_tokens or task.answer_len + 1
    out = []
    with _DenseMLPs(model):
        for start in range(0, samples, batch):
            prompts, _ = task.sample(min(batch, samples - start), rng)
            prompts = prompts.to(dev)
            sampler = PlainSampler(model, prompts.shape[0], prompts.shape[1] + new_tokens + 2,
                                   SamplingParams(temperature=temperature), cuda_graph=False)
            out.append(torch.cat([prompts, sampler.generate(prompts, new_tokens).tokens], 1))
    return out


# --------------------------------------------------------------------------- run directories

def save_lm_checkpoint(run_dir: str, model: TransformerLM, version: int = 0) -> str:
    """Checkpoint a language model: weights (tied head left out) and lm_config.json beside them."""
    weights = {k: v for k, v in model.state_dict().items()
               if not (model.config.tie_embeddings and k == "head.weight")}
    path = save_checkpoint(run_dir, version, weights, {}, {})
    with open(os.path.join(path, LM_CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(asdict(model.config), fh, indent=1)
    return path


def load_lm(run_dir: str, device="cpu", cats: bool = True) -> tuple[TransformerLM, str]:
    """(model, checkpoint folder) of a run's latest checkpoint; with ``cats`` and a config that
    asks for it (mlp.cats.sparsity), the stored thresholds for that sparsity are applied."""
    ckpt = load_latest(run_dir)
    if ckpt is None:
        raise ValueError(f"run_dir {run_dir!r} has no checkpoint ({checkpoint_root(run_dir)}/latest)")
    cfg_path = os.path.join(ckpt.path, LM_CONFIG_FILE)
    if not os.path.exists(cfg_path):
        raise ValueError(f"checkpoint {ckpt.path!r} has no {LM_CONFIG_FILE}: not a language-model run")
    with open(cfg_path, encoding="utf-8") as fh:
        model = TransformerLM(LMConfig(**json.load(fh)))
    missing, unexpected = model.load_state_dict(ckpt.weights, strict=False)
    if unexpected or set(missing) - {"head.weight"}:
        raise ValueError(f"checkpoint weights do not fit the config: missing {missing}, "
                         f"unexpected {unexpected}")
    model.to(device).eval()
    spec = model.config.mlp.get("cats")
    if cats and spec is not None:
        apply_cats(model, load_thresholds(ckpt.path, float(spec["sparsity"])))
    return model, ckpt.path


def save_thresholds(ckpt_path: str, sparsity: float, thresholds: list[float], **meta) -> str:
    """Add (or replace) the thresholds for ``sparsity`` in the checkpoint's cats_thresholds.json."""
    path = os.path.join(ckpt_path, THRESHOLDS_FILE)
    data = {"thresholds": {}, "meta": {}}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    key = f"{sparsity:g}"
    data["thresholds"][key] = [float(t) for t in thresholds]
    data["meta"][key] = meta
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)
    return path


def load_thresholds(ckpt_path: str, sparsity: float) -> list[float]:
    path = os.path.join(ckpt_path, THRESHOLDS_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            table = json.load(fh)["thresholds"]
    except FileNotFoundError:
        raise ValueError(f"no {THRESHOLDS_FILE} beside {ckpt_path!r}: run "
                         f"`srl calibrate-cats RUN_DIR --sparsity {sparsity:g}` first") from None
    key = f"{sparsity:g}"
    if key not in table:
        raise ValueError(f"{path} has thresholds for sparsity {sorted(table)}, not {key}")
    return table[key]


TASKS = ("addition", "sort", "mixed")


def calibrate_run(run_dir: str, sparsity: float, task: str = "mixed", samples: int = 256,
                  batch: int = 64, seed: int = 0, device="cpu") -> tuple[str, list[float]]:
    """Calibrate a run's latest checkpoint on text-task prompts; returns (thresholds file, thresholds)."""
    from srl.envs.text import AdditionTask, MixedTask, SortTask

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    model, ckpt_path = load_lm(run_dir, device, cats=False)
    text_task = {"addition": AdditionTask, "sort": SortTask, "mixed": MixedTask}[task]()
    if task == "mixed":
        text_task = _MixedPrompts(text_task)
    rng = np.random.default_rng(seed)
    data = task_batches(model, text_task, samples, batch, rng)
    thresholds = calibrate_cats(model, data, sparsity)
    path = save_thresholds(ckpt_path, sparsity, thresholds, task=task, samples=samples, seed=seed,
                           positions=int(sum(t.numel() for t in data)))
    return path, thresholds


class _MixedPrompts:
    """Prompts of both tasks of a MixedTask, half each (its own ``sample`` gives only addition)."""

    def __init__(self, mixed):
        self.tasks = (mixed.addition, mixed.sort)
        self.answer_len = max(t.answer_len for t in self.tasks)
        self.turn = 0

    def sample(self, n, rng):
        self.turn += 1
        return self.tasks[self.turn % 2].sample(n, rng)

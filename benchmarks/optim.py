"""Sophia vs AdamW on a small GPT over a generated text corpus (issue 5).

Protocol (fixed before any result was seen):
  1. Corpus: character-level text from a seeded generator (a small probabilistic grammar with
     number agreement and relative clauses, multi-digit additions, and copy lines), so nothing
     is downloaded; a held-out validation split from a different seed.
  2. Timing: per-step wall time of a full training step (forward, backward, clip, optimizer
     step, and for Sophia the GNB refresh every `update_period` steps, amortised) and of the
     optimizer step alone, each the median of several timed blocks after warm-up.
  3. Sweep: AdamW and Sophia, each over a small grid of peak learning rates, same steps,
     batch, warm-up + cosine schedule, gradient clipping and seed. The best rate of each is the
     one with the lowest final validation loss.
  4. Steps to target: the first evaluation step at which the best Sophia run's validation loss
     is at or below the best AdamW run's final loss (curve crossing), and, as in the paper, a
     Sophia run with a shorter schedule (0.5x and 0.67x the steps) checked against that target.

Usage:
    python benchmarks/optim.py --time-budget-s 250 --out results.json   # GPU, about 5 minutes
    python benchmarks/optim.py --timing-only --n-layer 12 --d-model 768 --n-head 12 --ctx 512 --batch 16
    python benchmarks/optim.py --quick --device cpu                     # a smoke run

Results and their reading: docs/benchmarks.md, "Sophia vs AdamW"; JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from srl.optim import Sophia, build_optimizer, gnb_loss, gnb_num_predictions


@dataclass
class Args:
    device: str = "cuda"
    """torch device"""
    seed: int = 0
    """seed of the corpus, the initialisation and the batch order"""
    n_layer: int = 6
    """transformer blocks"""
    d_model: int = 384
    """residual width"""
    n_head: int = 6
    """attention heads"""
    ctx: int = 256
    """characters per sequence"""
    batch: int = 64
    """sequences per step"""
    steps: int = 0
    """steps per run; 0 = chosen from time_budget_s after the timing phase"""
    max_steps: int = 4000
    """cap on the automatically chosen number of steps"""
    time_budget_s: float = 280.0
    """wall time the sweep and short-schedule runs may use (when steps == 0)"""
    train_chars: int = 12_000_000
    """size of the generated training text (batches are random windows)"""
    adamw_lrs: str = "5e-4,1e-3,2e-3"
    """AdamW peak learning rates to sweep"""
    sophia_lrs: str = "1.25e-4,2.5e-4,5e-4,1e-3"
    """Sophia peak learning rates to sweep"""
    adamw_wd: float = 0.1
    """AdamW weight decay"""
    sophia_wd: float = 0.2
    """Sophia weight decay (the paper's configs use 2x AdamW's)"""
    rho: float = 0.04
    """Sophia's clipping scale (gamma in the paper); the class default"""
    update_period: int = 10
    """Sophia Hessian refresh period k"""
    warmup_frac: float = 0.05
    """linear warm-up, fraction of the steps; then cosine to 0.1x peak"""
    grad_clip: float = 1.0
    """global gradient-norm clip for both optimizers"""
    evals: int = 40
    """validation evaluations per run"""
    val_batches: int = 8
    """batches per validation evaluation"""
    hess_frac: float = 1.0
    """fraction of the batch's sequences the GNB refresh uses (1.0: the whole current batch, as the
    srl trainer does; the paper's runs used a smaller Hessian batch)"""
    timing_variants: str = "adamw,sophia,adamw_fused,sophia_nostats,sophia_norefresh,sophia_halfrefresh"
    """variants timed before the sweep (adamw and sophia are always timed)"""
    timing_only: bool = False
    """time the variants, skip the sweep (e.g. for a larger, compute-bound model)"""
    quick: bool = False
    """tiny model, few steps, one lr each: a smoke test of the script"""
    out: str = ""
    """write the JSON results here"""


# ----------------------------------------------------------------------------- corpus
NOUNS = "cat dog bird fox goat horse robot child teacher farmer king queen river tree house ship".split()
ADJS = "small big red old young quiet happy green dark bright lazy clever".split()
VERBS = "see chase like find follow help watch hear lift push".split()
PREPS = "near under behind above beside".split()
NAMES = "ada bob cy dee eve fay gus hal ivy jo".split()


def _noun_phrase(rng: random.Random, depth: int) -> tuple[str, bool]:
    plural = rng.random() < 0.4
    words = [rng.choice(["the", "a", "every", "some"]) if not plural else rng.choice(["the", "some", "many", "two"])]
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        words.append(rng.choice(ADJS))
    words.append(rng.choice(NOUNS) + ("s" if plural else ""))
    if depth < 2 and rng.random() < 0.25:  # relative clause; its verb agrees with this noun
        obj, _ = _noun_phrase(rng, depth + 1)
        words += ["that", _verb(rng, plural), obj]
    if depth < 2 and rng.random() < 0.2:
        obj, _ = _noun_phrase(rng, depth + 1)
        words += [rng.choice(PREPS), obj]
    return " ".join(words), plural


def _verb(rng: random.Random, plural: bool) -> str:
    v = rng.choice(VERBS)
    if plural:
        return v
    return v + ("es" if v.endswith(("sh", "ch")) else "s")


def _line(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.55:  # grammar: subject-verb number agreement across clauses
        subj, plural = _noun_phrase(rng, 0)
        obj, _ = _noun_phrase(rng, 1)
        s = f"{subj} {_verb(rng, plural)} {obj}."
        if rng.random() < 0.3:
            s = f"{rng.choice(NAMES)} says {s}"
        return s
    if r < 0.8:  # addition of up to 4-digit numbers
        a, b = rng.randrange(10 ** rng.randint(1, 4)), rng.randrange(10 ** rng.randint(1, 4))
        return f"{a}+{b}={a + b}."
    n = rng.randint(3, 12)  # copy: a random letter string repeated after a marker
    s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))
    return f"copy {s} > {s}."


def generate_text(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        s = _line(rng) + "\n"
        parts.append(s)
        size += len(s)
    return "".join(parts)[:n_chars]


def make_corpus(args: Args) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    train = generate_text(args.train_chars, args.seed)
    val = generate_text(max(args.val_batches * args.batch * (args.ctx + 1) * 2, 200_000), args.seed + 10_000)
    vocab = sorted(set(train) | set(val))
    lut = torch.zeros(128, dtype=torch.uint8)
    for i, c in enumerate(vocab):
        lut[ord(c)] = i

    def encode(s: str) -> torch.Tensor:
        return lut[torch.frombuffer(bytearray(s.encode("ascii")), dtype=torch.uint8).long()]

    return encode(train), encode(val), vocab


def get_batch(data: torch.Tensor, args: Args, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - args.ctx - 1, (args.batch,), generator=gen)
    idx = starts[:, None] + torch.arange(args.ctx + 1)  # (B, T+1)
    chunk = data[idx].long().to(args.device, non_blocking=True)
    return chunk[:, :-1], chunk[:, 1:]


# ----------------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A nanoGPT-style decoder: learned positions, pre-LN blocks, tied embedding."""

    def __init__(self, vocab: int, args: Args):
        super().__init__()
        self.tok = nn.Embedding(vocab, args.d_model)
        self.pos = nn.Parameter(torch.zeros(args.ctx, args.d_model))
        self.blocks = nn.ModuleList(Block(args.d_model, args.n_head) for _ in range(args.n_layer))
        self.ln = nn.LayerNorm(args.d_model)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith(("proj.weight", "out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * args.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]  # (B, T, D)
        for b in self.blocks:
            x = b(x)
        return self.ln(x) @ self.tok.weight.T  # (B, T, V)


def param_groups(model: nn.Module, wd: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "pos"]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n != "pos")]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(name: str, model: nn.Module, lr: float, args: Args) -> torch.optim.Optimizer:
    """"adamw" / "sophia"; timing variants: "adamw_fused", "sophia_nostats" (no win-rate
    counting), "sophia_norefresh" (no GNB refresh: the cost of the refresh is the difference),
    "sophia_halfrefresh" (refresh on half the batch)."""
    if name.startswith("adamw"):
        return build_optimizer(param_groups(model, args.adamw_wd), "adamw", lr=lr, betas=(0.9, 0.95),
                               fused=name == "adamw_fused")
    return build_optimizer(
        param_groups(model, args.sophia_wd), "sophia", lr=lr, betas=(0.965, 0.99), rho=args.rho,
        update_period=10**9 if name == "sophia_norefresh" else args.update_period,
        win_rate_every=0 if name == "sophia_nostats" else None,
    )


def lr_at(step: int, steps: int, peak: float, warmup_frac: float) -> float:
    warm = max(1, int(warmup_frac * steps))
    if step < warm:
        return peak * (step + 1) / warm
    frac = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


# ----------------------------------------------------------------------------- training
def autocast(args: Args):
    return torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else torch.autocast("cpu", enabled=False)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, args: Args) -> None:
    with autocast(args):
        logits = model(x)
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if isinstance(opt, Sophia) and opt.hessian_due():  # GNB refresh on the same batch
        with autocast(args):
            logits = model(x[: max(1, int(round(len(x) * args.hess_frac)))])
        gnb_loss(logits).backward()
        opt.update_hessian(scale=gnb_num_predictions(logits))
        opt.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(model: nn.Module, val: torch.Tensor, args: Args) -> float:
    gen = torch.Generator().manual_seed(12345)  # the same windows at every evaluation
    total = 0.0
    for _ in range(args.val_batches):
        x, y = get_batch(val, args, gen)
        with autocast(args):
            logits = model(x)
        total += F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1)).item()
    return total / args.val_batches


def sync(args: Args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def run(name: str, lr: float, steps: int, train: torch.Tensor, val: torch.Tensor, vocab: int, args: Args) -> dict:
    torch.manual_seed(args.seed)
    model = GPT(vocab, args).to(args.device)
    opt = make_optimizer(name, model, lr, args)
    gen = torch.Generator().manual_seed(args.seed + 1)
    every = max(1, steps // args.evals)
    curve, wins, train_s = [], [], 0.0
    for step in range(steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, args.warmup_frac)
        x, y = get_batch(train, args, gen)
        train_step(model, opt, x, y, args)
        if (step + 1) % every == 0 or step + 1 == steps:
            sync(args)
            train_s += time.perf_counter() - t0
            curve.append((step + 1, evaluate(model, val, args)))
            if isinstance(opt, Sophia):
                wins.append((step + 1, opt.win_rate()))
        else:
            train_s += time.perf_counter() - t0
    final = curve[-1][1]
    ok = math.isfinite(final)
    print(f"  {name:6s} lr={lr:.1e} steps={steps} final val={final:.4f} ({train_s / steps * 1e3:.1f} ms/step)", flush=True)
    return dict(optimizer=name.split("_")[0], impl=name, lr=lr, steps=steps, final_val=final if ok else None, curve=curve, win_rate=wins,
                ms_per_step=train_s / steps * 1e3)


def steps_to_reach(curve: list, target: float) -> int | None:
    for step, loss in curve:
        if loss <= target:
            return step
    return None


# ----------------------------------------------------------------------------- timing
def time_steps(name: str, train: torch.Tensor, vocab: int, args: Args, blocks: int = 5, per_block: int = 40) -> dict:
    if name == "sophia_halfrefresh":  # GNB refresh on half of the batch
        args = dataclasses.replace(args, hess_frac=0.5)
    torch.manual_seed(args.seed)
    model = GPT(vocab, args).to(args.device)
    opt = make_optimizer(name, model, 1e-4, args)
    gen = torch.Generator().manual_seed(0)
    batches = [get_batch(train, args, gen) for _ in range(per_block)]  # per_block is a multiple of k
    for x, y in batches[: 2 * args.update_period]:
        train_step(model, opt, x, y, args)
    sync(args)
    full = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for x, y in batches:
            train_step(model, opt, x, y, args)
        sync(args)
        full.append((time.perf_counter() - t0) / per_block * 1e3)
    # Optimizer step alone, on the last gradients (the parameters move, the work is the same).
    x, y = batches[0]
    with autocast(args):
        logits = model(x)
    F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1)).backward()
    for _ in range(10):
        opt.step()
    sync(args)
    only = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(per_block):
            opt.step()
        sync(args)
        only.append((time.perf_counter() - t0) / per_block * 1e3)
    return dict(step_ms=statistics.median(full), step_ms_all=full, opt_ms=statistics.median(only), opt_ms_all=only)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> Args:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true")
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=kind, default=f.default)
    args = Args(**vars(p.parse_args(argv)))
    if args.quick:
        args = dataclasses.replace(args, n_layer=2, d_model=64, n_head=2, ctx=64, batch=8, steps=args.steps or 60,
                                   train_chars=300_000, adamw_lrs="3e-3", sophia_lrs="2e-3", evals=6, val_batches=2)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    train, val, vocab = make_corpus(args)
    V = len(vocab)
    n_params = sum(p.numel() for p in GPT(V, args).parameters())
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"corpus: {len(train):,} train / {len(val):,} val chars, vocab {V}; model {n_params / 1e6:.2f}M params; "
          f"device {device_name}; torch {torch.__version__} ({time.perf_counter() - t_start:.0f}s)", flush=True)

    names = ["adamw", "sophia"] + [n for n in args.timing_variants.split(",") if n not in ("adamw", "sophia", "")]
    if not args.device.startswith("cuda"):
        names = [n for n in names if n != "adamw_fused"]
    adamw = "adamw_fused" if args.device.startswith("cuda") else "adamw"  # the fastest torch AdamW
    timing = {}
    for name in names:
        try:
            timing[name] = time_steps(name, train, V, args)
        except Exception as e:  # an optional variant failing must not end the benchmark
            print(f"  timing {name} failed: {type(e).__name__}: {e}", flush=True)
    for name, t in timing.items():
        print(f"  timing {name}: step {t['step_ms']:.2f} ms, optimizer alone {t['opt_ms']:.3f} ms", flush=True)

    if args.timing_only:
        result = dict(args=dataclasses.asdict(args), device=device_name, torch=torch.__version__, n_params=n_params,
                      timing=timing)
        print("\n| timing variant | full step ms | optimizer step ms |\n|---|---|---|")
        for name, t in timing.items():
            print(f"| {name} | {t['step_ms']:.2f} | {t['opt_ms']:.3f} |")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return result
    adamw_lrs = [float(s) for s in args.adamw_lrs.split(",")]
    sophia_lrs = [float(s) for s in args.sophia_lrs.split(",")]
    steps = args.steps
    if steps == 0:  # fit the sweep plus the two short Sophia runs (1.17 run-equivalents) into the budget
        per_run_s = (timing[adamw]["step_ms"] + timing["sophia"]["step_ms"]) / 2 * 1.3 / 1e3
        steps = int(args.time_budget_s / (per_run_s * (len(adamw_lrs) + len(sophia_lrs) + 1.17)))
        steps = max(200, min(args.max_steps, steps // 100 * 100))
    tokens = steps * args.batch * args.ctx
    print(f"steps per run: {steps} ({tokens / 1e6:.1f}M tokens, {tokens / len(train):.1f} passes over the train text)", flush=True)

    runs = []
    for name, lrs in ((adamw, adamw_lrs), ("sophia", sophia_lrs)):
        for lr in lrs:
            runs.append(run(name, lr, steps, train, val, V, args))
            if args.out:  # partial results survive a time-out
                with open(args.out, "w") as f:
                    json.dump(dict(device=device_name, n_params=n_params, steps=steps, timing=timing, runs=runs), f)
    finite = lambda name: [r for r in runs if r["optimizer"] == name and r["final_val"] is not None]  # noqa: E731
    best_a = min(finite("adamw"), key=lambda r: r["final_val"])
    best_s = min(finite("sophia"), key=lambda r: r["final_val"])
    target = best_a["final_val"]
    cross = steps_to_reach(best_s["curve"], target)
    short = []
    for frac in (0.5, 0.67):
        r = run("sophia", best_s["lr"], int(steps * frac), train, val, V, args)
        r["frac"] = frac
        r["reaches_target"] = r["final_val"] is not None and r["final_val"] <= target
        short.append(r)

    step_ratio = timing["sophia"]["step_ms"] / timing[adamw]["step_ms"]
    opt_ratio = timing["sophia"]["opt_ms"] / timing[adamw]["opt_ms"]
    result = dict(
        args=dataclasses.asdict(args), device=device_name, torch=torch.__version__, n_params=n_params, vocab=V,
        steps=steps, tokens_per_run=tokens, timing=timing, runs=runs, short_runs=short,
        best_adamw_lr=best_a["lr"], best_sophia_lr=best_s["lr"], target_val=target,
        adamw_final_val=best_a["final_val"], sophia_final_val=best_s["final_val"],
        sophia_steps_to_target=cross, sophia_steps_ratio=None if cross is None else cross / steps,
        adamw_impl=adamw, step_time_ratio=step_ratio, opt_time_ratio=opt_ratio, wall_s=time.perf_counter() - t_start,
    )
    print("\n| optimizer | lr | final val loss |")
    print("|---|---|---|")
    for r in runs + short:
        tag = f" ({r['steps']} steps)" if r["steps"] != steps else ""
        fv = "diverged" if r["final_val"] is None else f"{r['final_val']:.4f}"
        print(f"| {r['optimizer']}{tag} | {r['lr']:.0e} | {fv} |")
    print(f"\nbest AdamW lr {best_a['lr']:.0e}: final val {target:.4f} at {steps} steps")
    print(f"best Sophia lr {best_s['lr']:.0e}: final val {best_s['final_val']:.4f}; reaches AdamW's final loss at "
          f"{cross} steps ({'never' if cross is None else f'{cross / steps:.2f}x'})")
    for r in short:
        print(f"Sophia with a {r['frac']}x schedule ({r['steps']} steps): final val {r['final_val']}, "
              f"reaches target: {r['reaches_target']}")
    print(f"per-step time Sophia/AdamW ({adamw}): {step_ratio:.3f} (full step, GNB refresh amortised); "
          f"optimizer step alone {opt_ratio:.3f}")
    print("\n| timing variant | full step ms | optimizer step ms |\n|---|---|---|")
    for name, t in timing.items():
        print(f"| {name} | {t['step_ms']:.2f} | {t['opt_ms']:.3f} |")
    if best_s["win_rate"]:
        print("Sophia win rate (fraction not clipped) along the best run:",
              ", ".join(f"{s}:{w:.2f}" for s, w in best_s["win_rate"][:: max(1, len(best_s['win_rate']) // 8)]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

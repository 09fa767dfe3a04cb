"""Ladder Residual against the standard residual on one device: training parity and decode speed.

``--train``: a small standard LM and a small Ladder LM (same size, seed, data, optimizer and step
budget) trained on the packed text-task stream (``srl.envs.text.MixedTask``); training loss
curves, held-out loss and greedy exact-match accuracy on addition. Runs on CPU in minutes.

``--speed``: decode tokens/s of single-process standard and Ladder models of the same size
(plain sampling, CUDA graphs, bf16) at batch 1 and 16, interleaved repeats in the same run,
medians and the ladder/standard ratio with the repeat-to-repeat spread as the noise yardstick.
Without communication Ladder only reorders the residual adds, so the ratio should be ~1.

    PYTHONPATH=. python3 benchmarks/ladder.py --train --out benchmarks/results/ladder_train_cpu2.json
    PYTHONPATH=. python3 benchmarks/ladder.py --speed --out benchmarks/results/ladder_speed_h200.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from srl.envs.text import VOCAB, AdditionTask, MixedTask
from srl.generation.decode import PlainSampler
from srl.generation.sampling import SamplingParams
from srl.policies.lm import LMConfig, TransformerLM

TRAIN_MODEL = dict(vocab_size=64, d_model=128, n_layers=4, n_heads=4, max_seq_len=128)
SPEED_MODEL = dict(vocab_size=32768, d_model=1024, n_layers=12, n_heads=16, max_seq_len=1024)


def log(*a) -> None:
    print(*a, flush=True)


def write(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)


# --------------------------------------------------------------------------- training parity

def train_one(residual: str, args, device) -> dict:
    torch.manual_seed(args.seed)
    model = TransformerLM(LMConfig(residual=residual, **TRAIN_MODEL)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    task, rng = MixedTask(), np.random.default_rng(args.seed)
    held_out = task.stream(64, args.seq + 1, np.random.default_rng(10_000)).to(device)
    curve, window, t0 = [], [], time.time()
    for step in range(args.steps):
        scale = min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = args.lr * scale
        x = task.stream(args.batch, args.seq + 1, rng).to(device)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append(loss.item())
        if (step + 1) % args.log_every == 0:
            curve.append({"step": step + 1, "loss": statistics.fmean(window),
                          "held_out": held_out_loss(model, held_out)})
            window = []
            log(f"  {residual:8s} step {step + 1:5d} train {curve[-1]['loss']:.4f} "
                f"held-out {curve[-1]['held_out']:.4f} ({time.time() - t0:.0f}s)")
    return {"residual": residual, "curve": curve, "seconds": time.time() - t0,
            "final_held_out": curve[-1]["held_out"], "addition_exact_match": exact_match(model, device)}


@torch.no_grad()
def held_out_loss(model, x) -> float:
    model.eval()
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    model.train()
    return float(loss)


@torch.no_grad()
def exact_match(model, device, n: int = 256) -> float:
    task = AdditionTask()
    prompts, answers = task.sample(n, np.random.default_rng(20_000))
    model.eval()
    s = PlainSampler(model, n, 32, SamplingParams(temperature=0.0), cuda_graph=False)
    out = s.generate(prompts.to(device), answers.shape[1] + 1)
    return float(task.rewards(answers, out.tokens.cpu()).mean())


def run_train(args) -> dict:
    device = torch.device(args.device)
    runs = [train_one(r, args, device) for r in ("standard", "ladder")]
    return {"mode": "train", "model": TRAIN_MODEL, "steps": args.steps, "batch": args.batch,
            "seq": args.seq, "lr": args.lr, "seed": args.seed, "device": str(device),
            "torch": torch.__version__, "runs": runs}


# --------------------------------------------------------------------------- decode speed

def run_speed(args) -> dict:
    device = torch.device(args.device)
    models = {}
    for residual in ("standard", "ladder"):
        torch.manual_seed(0)  # same weights: only the wiring differs
        models[residual] = TransformerLM(LMConfig(residual=residual, **SPEED_MODEL)).to(
            device, torch.bfloat16).eval()
    result = {"mode": "speed", "model": SPEED_MODEL, "new_tokens": args.new_tokens,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "rows": []}
    prompt_len = 16
    for batch in args.batches:
        prompt = torch.randint(0, len(VOCAB), (batch, prompt_len), device=device)
        samplers = {r: PlainSampler(m, batch, prompt_len + args.new_tokens + 16,
                                    SamplingParams(temperature=1.0), cuda_graph=args.cuda_graph)
                    for r, m in models.items()}
        times = {r: [] for r in samplers}
        for s in samplers.values():
            s.generate(prompt, args.new_tokens)  # warm-up
        for _ in range(args.repeats):  # interleaved, so drifts hit both alike
            for r, s in samplers.items():
                times[r].append(s.generate(prompt, args.new_tokens).seconds)
        for s in samplers.values():
            s.close()
        row = {"batch": batch}
        for r, ts in times.items():
            med = statistics.median(ts)
            row[r] = {"median_s": med, "tokens_per_s": batch * args.new_tokens / med,
                      "spread": (max(ts) - min(ts)) / med, "times": ts}
        row["ladder_over_standard"] = row["ladder"]["tokens_per_s"] / row["standard"]["tokens_per_s"]
        result["rows"].append(row)
        log(f"batch {batch:3d}: standard {row['standard']['tokens_per_s']:9.1f} tok/s "
            f"(spread {row['standard']['spread']:.3f}), ladder {row['ladder']['tokens_per_s']:9.1f} "
            f"tok/s (spread {row['ladder']['spread']:.3f}), ratio {row['ladder_over_standard']:.3f}")
        write(args.out, result)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="training parity on the text task")
    mode.add_argument("--speed", action="store_true", help="decode tokens/s, standard vs ladder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false")
    ap.add_argument("--d-model", type=int, default=None, help="--train model width")
    ap.add_argument("--layers", type=int, default=None, help="--train model depth")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (checks the script on CPU)")
    args = ap.parse_args()
    TRAIN_MODEL.update({k: v for k, v in (("d_model", args.d_model), ("n_layers", args.layers))
                        if v is not None})
    if args.tiny:
        TRAIN_MODEL.update(d_model=32, n_layers=2)
        SPEED_MODEL.update(vocab_size=64, d_model=64, n_layers=2, n_heads=2)
        args.steps, args.log_every, args.new_tokens, args.repeats = 20, 10, 16, 2
    result = run_train(args) if args.train else run_speed(args)
    write(args.out, result)


if __name__ == "__main__":
    main()

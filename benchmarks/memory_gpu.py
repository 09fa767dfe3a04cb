"""Transformer memory policy on the GPU: the policy worker's inference step and the learner's pass.

1. ``step``: env steps/s of the policy worker's memory step (state gather, reset, the policy, the
   state scatter, the copies to and from the host) with ``--envs`` envs' memories on the GPU,
   served in requests of ``--batches`` envs each, eager (``StateTable`` + ``policy.act``, what
   ``workers.policies.cuda_graph: false`` runs) against CUDA-graph replays (``GraphedMemoryStep``).
   Episodes end at random (1 in 100 steps), so resets run too. Sockets are not in the loop.
2. ``train``: tokens/s of ``evaluate_sequence`` forward + backward (PPO's minibatch pass: ``T + 1``
   steps of ``B`` envs from a cached memory of ``M`` steps, random episode starts) with attention on
   srl's FlashAttention (per-row key starts) against torch's SDPA with the same boolean mask.

    python benchmarks/memory_gpu.py --json memory_gpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from srl.config import PolicyConfig
from srl.envs.vector import SpaceInfo
from srl.policies.graphed import GraphedMemoryStep
from srl.policies.memory import TransformerActorCritic
from srl.policies.state import StateTable

OBS = 32


def _policy(args, attention="srl") -> TransformerActorCritic:
    torch.manual_seed(0)
    cfg = PolicyConfig(type="transformer", d_model=args.d_model, layers=args.layers, heads=args.heads,
                       memory=args.memory, hidden=[args.d_model], attention=attention)
    return TransformerActorCritic(SpaceInfo((OBS,), True, 4), cfg).cuda()


def _requests(envs: int, batch: int, steps: int, seed: int = 0):
    g = np.random.default_rng(seed)
    ids = np.arange(envs, dtype=np.int64)
    for _ in range(steps):
        for lo in range(0, envs, batch):
            chunk = ids[lo:lo + batch]
            yield chunk, g.standard_normal((len(chunk), OBS)).astype(np.float32), g.random(len(chunk)) < 0.01


def _eager_step(policy, table: StateTable):
    def step(obs, first, ids):
        rows, state = table.get(ids)
        action, logp, new = policy.act(torch.from_numpy(obs).cuda(), torch.from_numpy(first).cuda(), state)
        table.put(rows, new)
        return action.cpu().numpy(), logp.cpu().numpy()
    return step


def _steps_per_s(step, envs: int, batch: int, steps: int) -> float:
    for ids, obs, first in _requests(envs, batch, 3, seed=1):  # warm-up: capture, compile
        step(obs, first, ids)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for ids, obs, first in _requests(envs, batch, steps):
        step(obs, first, ids)
    torch.cuda.synchronize()
    return envs * steps / (time.perf_counter() - t0)


def bench_step(args) -> list[dict]:
    rows = []
    for batch in args.batches:
        out = {"envs": args.envs, "batch": batch}
        for mode in ("eager", "graphed"):
            policy = _policy(args)
            if mode == "eager":
                step = _eager_step(policy, StateTable(policy, args.envs, "cuda", capacity=args.envs))
            else:
                step = GraphedMemoryStep(policy, args.envs, batch, (OBS,), "float32", "cuda").step
            out[mode] = _steps_per_s(step, args.envs, batch, args.steps)
        out["graphed_over_eager"] = out["graphed"] / out["eager"]
        rows.append(out)
        print(f"step  envs {args.envs:5d} batch {batch:5d}  eager {out['eager']:>10,.0f}  graphed "
              f"{out['graphed']:>10,.0f} env steps/s  x{out['graphed_over_eager']:.2f}", flush=True)
    return rows


def _batch(args, B: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(T + 1, B, OBS, generator=g).cuda()
    action = torch.randint(0, 4, (T, B), generator=g).cuda()
    first = (torch.rand(T + 1, B, generator=g) < 0.02).cuda()
    L, M, d = args.layers, args.memory, args.d_model
    state = {"mem": torch.randn(B, L, M, d, generator=g).cuda(), "len": torch.randint(0, M + 1, (B,), generator=g).cuda()}
    return obs, action, first, state


def _train_ms(policy, batch, iters: int) -> float:
    def once():
        logp, ent, value, _ = policy.evaluate_sequence(*batch)
        (logp.mean() + ent.mean() + value.square().mean()).backward()
    for _ in range(3):
        once()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        once()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def bench_train(args) -> list[dict]:
    rows = []
    for B, T in args.train_shapes:
        batch = _batch(args, B, T)
        out = {"B": B, "T": T, "memory": args.memory}
        for attention in ("sdpa", "srl"):
            policy = _policy(args, attention)
            out[f"{attention}_ms"] = _train_ms(policy, batch, args.iters)
            out[f"{attention}_tokens_per_s"] = B * (T + 1) / out[f"{attention}_ms"] * 1e3
        out["srl_over_sdpa"] = out["sdpa_ms"] / out["srl_ms"]
        rows.append(out)
        print(f"train B {B:5d} T {T:4d} M {args.memory}  sdpa {out['sdpa_ms']:8.2f} ms  srl {out['srl_ms']:8.2f} ms"
              f"  ({out['srl_tokens_per_s']:,.0f} tokens/s)  x{out['srl_over_sdpa']:.2f}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--envs", type=int, default=1024)
    p.add_argument("--batches", type=int, nargs="+", default=[128, 512, 1024])
    p.add_argument("--steps", type=int, default=100, help="steps of every env, timed")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--memory", type=int, default=64)
    p.add_argument("--train-shapes", type=lambda s: tuple(map(int, s.split("x"))), nargs="+",
                   default=[(256, 128), (1024, 128)], help="BxT of a learner minibatch")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "python": platform.python_version(),
              "settings": {k: v for k, v in vars(args).items() if k != "json"},
              "step": bench_step(args), "train": bench_train(args)}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()

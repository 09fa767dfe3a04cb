"""Where srl's Atari time goes, piece by piece, on one machine (the parts of the whole-system rate).

Each probe times one stage of the dataflow alone, in this process:

- ``env``: one actor's vector env (``envs`` games, one ALE thread) with random actions: frames/s
  one core can step, the most one actor process can produce;
- ``wire``: encoding and decoding (with the HMAC tag) one inference request and one trajectory of
  the config's shapes: what every hop costs in CPU time per frame;
- ``policy``: one forward pass of the config's policy on ``device`` at several batch sizes,
  uint8 observations copied in and actions copied out, fp32 and bf16 / channels-last;
- ``learner``: ``learner.train`` on synthetic batches of a few shapes (batch size, epochs,
  minibatches): frames/s the trainer can learn and ms per minibatch step, fp32 and bf16 / channels-last.

Frames are env steps x frame skip 4.

    python benchmarks/atari_probe.py --device cuda --out probe.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from srl.config import experiment_from_dict  # noqa: E402
from srl.envs.atari import frame_skip, make_atari_vector_env  # noqa: E402
from srl.envs.vector import SpaceInfo  # noqa: E402
from srl.plan import build_learner, build_policy  # noqa: E402
from srl.system import wire  # noqa: E402


def _timed(fn, seconds: float, sync=lambda: None) -> float:
    """Seconds per call of ``fn`` over about ``seconds`` (after two warm-up calls)."""
    fn(), fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync()
    return (time.perf_counter() - t0) / n


def probe_env(cfg, envs: int, seconds: float) -> dict:
    env = make_atari_vector_env(cfg.env.id, {**cfg.env.kwargs, "num_threads": 1}, envs)
    env.reset(seed=0)
    actions = np.random.default_rng(0).integers(0, env.single_action_space.n, (64, envs))
    i = [0]

    def step():
        env.step(actions[i[0] % 64])
        i[0] += 1

    s = _timed(step, seconds)
    env.close()
    return {"probe": "env", "envs": envs, "threads": 1, "step_ms": s * 1e3,
            "frames_per_s": envs * frame_skip(cfg.env.kwargs) / s}


def probe_wire(cfg, info: SpaceInfo, seconds: float) -> list[dict]:
    a = cfg.workers.actors
    B, T = a.envs_per_actor // a.ring, a.rollout_len
    key = os.urandom(32)
    rng = np.random.default_rng(0)
    obs = rng.integers(0, 255, (B, *info.obs_shape), dtype=np.uint8)
    traj = {"obs": rng.integers(0, 255, (T + 1, B, *info.obs_shape), dtype=np.uint8),
            "action": np.zeros((T, B), np.int64), "logp": np.zeros((T, B), np.float32),
            "reward": np.zeros((T, B), np.float32), "terminated": np.zeros((T, B), bool),
            "truncated": np.zeros((T, B), bool), "valid": np.ones((T, B), bool)}
    out = []
    for name, arrays, steps in (("request", {"obs": obs, "env_ids": np.arange(B)}, B), ("trajectory", traj, T * B)):
        frames = [bytes(f) if not isinstance(f, bytes) else f for f in wire.encode("x", arrays, {"v": 1}, key)]
        nbytes = sum(len(f) for f in frames)
        enc = _timed(lambda: wire.encode("x", arrays, {"v": 1}, key), seconds / 4)
        dec = _timed(lambda: wire.decode(frames, key), seconds / 4)
        enc_plain = _timed(lambda: wire.encode("x", arrays, {"v": 1}, None), seconds / 4)
        out.append({"probe": "wire", "message": name, "env_steps": steps, "bytes": nbytes,
                    "encode_ms": enc * 1e3, "decode_ms": dec * 1e3, "encode_no_hmac_ms": enc_plain * 1e3,
                    "us_per_env_step": (enc + dec) * 1e6 / steps})
    return out


def probe_policy(cfg, data: dict, base: list[str], info: SpaceInfo, device: str, batches: list[int], seconds: float) -> list[dict]:
    out = []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for variant, extra in (("fp32", {}), ("bf16_cl", {"autocast": "bf16", "channels_last": True})):
        pcfg = experiment_from_dict(data, base + [f"policy.{k}={v}" for k, v in
                                                 {**{"autocast": "none", "channels_last": False}, **extra}.items()])
        policy = build_policy(info, pcfg.policy).to(device)
        for n in batches:
            obs = np.random.default_rng(0).integers(0, 255, (n, *info.obs_shape), dtype=np.uint8)

            def fwd():
                with torch.no_grad():
                    action, logp = policy.act(torch.from_numpy(obs).to(device))
                    action.cpu().numpy(), logp.cpu().numpy()

            s = _timed(fwd, seconds / len(batches), sync)
            out.append({"probe": "policy", "variant": variant, "batch": n, "ms": s * 1e3,
                        "frames_per_s": n * 4 / s})
    return out


def probe_learner(cfg, data: dict, base: list[str], info: SpaceInfo, device: str, seconds: float,
                  shapes: list[tuple[int, int, int]]) -> list[dict]:
    """``learner.train`` per (batch_size, epochs, minibatches) in ``shapes``, fp32 and bf16 /
    channels-last: what one update costs, so the batch shape for learning Pong can be sized."""
    T = cfg.workers.actors.rollout_len
    rng = np.random.default_rng(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = []
    for batch_size, epochs, minibatches in shapes:
        B = -(-batch_size // T)
        batch = {"obs": torch.from_numpy(rng.integers(0, 255, (T + 1, B, *info.obs_shape), dtype=np.uint8)),
                 "action": torch.from_numpy(rng.integers(0, info.n_actions, (T, B))),
                 "logp": torch.full((T, B), -float(np.log(info.n_actions)), dtype=torch.float32),
                 "reward": torch.from_numpy(rng.choice([-1.0, 0.0, 1.0], (T, B), p=[.01, .98, .01]).astype(np.float32)),
                 "terminated": torch.zeros((T, B), dtype=torch.bool),
                 "truncated": torch.zeros((T, B), dtype=torch.bool), "valid": torch.ones((T, B), dtype=torch.bool)}
        for variant, extra in (("fp32", "policy.autocast=none policy.channels_last=false"),
                               ("bf16_cl", "policy.autocast=bf16 policy.channels_last=true")):
            over = f"{extra} algorithm.batch_size={batch_size} algorithm.epochs={epochs} " \
                   f"algorithm.minibatches={minibatches}"
            pcfg = experiment_from_dict(data, base + over.split())
            learner = build_learner(build_policy(info, pcfg.policy), pcfg, device)
            dev_batch = {k: v.to(device) for k, v in batch.items()}
            s = _timed(lambda: learner.train(dev_batch), seconds, sync)
            out.append({"probe": "learner", "variant": variant, "steps": T * B, "epochs": epochs,
                        "minibatches": minibatches, "train_ms": s * 1e3,
                        "ms_per_minibatch_step": s * 1e3 / (epochs * minibatches),
                        "learned_frames_per_s": T * B * 4 / s})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "atari_pong.yaml"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--probes", default="env,wire,policy,learner")
    p.add_argument("--seconds", type=float, default=4.0, help="per probe")
    p.add_argument("--batches", default="16,64,224,448,896")
    p.add_argument("--learner-shapes", default="8192/2/4,4096/4/16",
                   help="batch_size/epochs/minibatches of the learner probe, comma separated")
    p.add_argument("--overrides", default="", help="srl overrides, space separated")
    p.add_argument("--out", default="atari_probe.json")
    args = p.parse_args()
    data = yaml.safe_load(open(args.config))
    base = args.overrides.split()
    cfg = experiment_from_dict(data, base)
    env = make_atari_vector_env(cfg.env.id, cfg.env.kwargs, 1)
    info = SpaceInfo(tuple(env.single_observation_space.shape), True, int(env.single_action_space.n),
                     obs_dtype="uint8")
    env.close()
    probes = set(args.probes.split(","))
    results: list[dict] = []

    def done(rows):
        for r in rows if isinstance(rows, list) else [rows]:
            results.append(r)
            print(json.dumps(r), flush=True)
        with open(args.out, "w") as fh:
            json.dump({"device": args.device, "config": args.config, "results": results}, fh, indent=1)

    a = cfg.workers.actors
    if "env" in probes:
        done(probe_env(cfg, a.envs_per_actor // a.ring, args.seconds))
        done(probe_env(cfg, a.envs_per_actor, args.seconds))
    if "wire" in probes:
        done(probe_wire(cfg, info, args.seconds))
    if "policy" in probes:
        done(probe_policy(cfg, data, base, info, args.device, [int(b) for b in args.batches.split(",")], args.seconds))
    if "learner" in probes:
        shapes = [tuple(int(x) for x in shape.split("/")) for shape in args.learner_shapes.split(",")]
        done(probe_learner(cfg, data, base, info, args.device, args.seconds, shapes))


if __name__ == "__main__":
    main()

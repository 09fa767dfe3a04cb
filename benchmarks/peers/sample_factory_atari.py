"""Sample Factory 2.1.1 APPO on an Atari game with its own Atari settings (``sf_examples/atari``).

Run by ``benchmarks/atari.py`` in a subprocess whose PYTHONPATH starts with the folder that
``benchmarks/atari_setup.sh`` fills (Sample Factory needs numpy<2 and gymnasium<1.0). The flags are
``atari_override_defaults`` of ``sf_examples/atari/atari_params.py`` (PongNoFrameskip-v4 with
SB3/CleanRL wrappers: noop starts, frame skip 4 with max-pool, episodic life, FIRE reset, clipped
rewards, 84x84 grayscale, 4 stacked frames) plus ``--num_workers``, ``--device`` and what
``--extra`` adds. Frames are counted as agent steps x frame skip 4.

Prints one ``stats: {json}`` line: frames/s over the measured window (after ``--warmup`` s of
collection) and, with ``--target``, when the mean raw return of the last 20 games reached it.

    PYTHONPATH=/tmp/sf-atari:benchmarks/peers python benchmarks/peers/sample_factory_atari.py \
        --game pong --workers 14 --seconds 60 [--target 18 --max-seconds 3600] [--extra "--async_rl=True"]
"""

import peer_common  # first: records the launch time before heavy imports

import argparse
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time

import ale_py  # noqa: F401  - registers the NoFrameskip-v4 ids with gymnasium 0.29 (no entry point)
from sample_factory.algo.runners.runner import AlgoObserver
from sample_factory.algo.utils.misc import EPISODIC
from sample_factory.train import make_runner
from sf_examples.atari.train_atari import parse_atari_args, register_atari_components

FRAME_SKIP = 4


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--game", default="pong")
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--device", default="gpu")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--warmup", type=float, default=20.0)
    p.add_argument("--seconds", type=float, default=60.0, help="measured window (throughput mode)")
    p.add_argument("--target", type=float, default=None, help="stop once the last 20 games average this")
    p.add_argument("--max-seconds", type=float, default=3600.0)
    p.add_argument("--extra", default="", help="more Sample Factory flags, one string")
    p.add_argument("--grace", type=float, default=60.0, help="start-up allowance (s from launch) before the "
                   "watchdog reports whatever it has")
    args = p.parse_args()
    train_dir = tempfile.mkdtemp(prefix="sf_atari_")
    argv = [f"--env=atari_{args.game}", f"--experiment=atari_{args.game}_seed{args.seed}", f"--train_dir={train_dir}",
            f"--num_workers={args.workers}", f"--device={args.device}", f"--seed={args.seed}",
            "--train_for_env_steps=10000000000"] + shlex.split(args.extra)
    register_atari_components()
    cfg = parse_atari_args(argv)
    cfg, runner = make_runner(cfg)
    rule = peer_common.StopRule(target=args.target if args.target is not None else float("inf"))
    samples: list[tuple[float, int]] = []

    def on_episode(runner, msg, policy_id):
        if rule.add(msg[EPISODIC]["reward"]) and args.target is not None:  # raw game score (RecordEpisodeStatistics)
            runner._stop_training()

    def tick():  # on the runner's event loop (each training step): count samples, stop when the time is up
        now, n = time.time(), int(runner.samples_collected[0])
        samples.append((now, n))
        first = next((t for t, c in samples if c > 0), None)
        budget = args.max_seconds if args.target is not None else args.warmup + args.seconds + 1.0
        if first is not None and now - first > budget:
            if args.target is None:  # throughput: report now; Sample Factory's shutdown can take 10 s
                finish("window done")
            runner._stop_training()

    class Clock(AlgoObserver):
        def on_training_step(self, runner, training_iteration_since_resume):
            tick()

    runner.register_episodic_stats_handler(on_episode)
    runner.register_observer(Clock())

    def finish(status) -> None:
        stats = {"peer": "sample_factory", "version": importlib.metadata.version("sample-factory"), "argv": argv,
                 "frames_per_s": _window_rate(samples, args.warmup, args.seconds) * FRAME_SKIP,
                 "frames": int(runner.samples_collected[0]) * FRAME_SKIP, "episodes": rule.episodes,
                 "mean_return_last20": rule.mean, "status": status, "samples": samples[-400:],
                 "target_reached_s": None if rule.t_reached is None else rule.t_reached - peer_common.T_LAUNCH}
        print("stats: " + json.dumps(stats), flush=True)
        shutil.rmtree(train_dir, ignore_errors=True)
        sys.stdout.flush()
        if os.getpgrp() == os.getpid():  # a group of our own: its worker processes go with us
            os.killpg(0, signal.SIGKILL)
        os._exit(0)

    def watchdog() -> None:  # a run whose workers died never reaches a training step: report anyway
        budget = args.max_seconds if args.target is not None else args.warmup + args.seconds
        time.sleep(max(0.0, peer_common.T_LAUNCH + budget + args.grace - time.time()))
        finish("watchdog: no clean stop")

    threading.Thread(target=watchdog, daemon=True).start()
    status = runner.init()
    if status == 0:
        status = runner.run()
    finish(int(status))


def _window_rate(samples: list[tuple[float, int]], warmup: float, seconds: float) -> float:
    """Agent steps/s between ``warmup`` s after the first collected step and ``seconds`` later."""
    started = [(t, n) for t, n in samples if n > 0]
    if len(started) < 2:
        return float("nan")
    t0 = started[0][0] + warmup
    window = [(t, n) for t, n in started if t0 <= t <= t0 + seconds]
    if len(window) < 2:  # too few training steps in the window: the whole run after the first step
        window = started
    (ta, na), (tb, nb) = window[0], window[-1]
    return (nb - na) / (tb - ta) if tb > ta else float("nan")


if __name__ == "__main__":
    main()

"""``srl run | eval``: the command line. Bad input ends with one line on stderr and status 2."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from srl.errors import ConfigError, SrlError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srl", description="Distributed reinforcement learning.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment file")
    run.add_argument("config", nargs="?", help="experiment YAML file")
    run.add_argument("overrides", nargs="*", help="field=value overrides, e.g. workers.actors.count=4")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    run.add_argument("--run-dir", metavar="DIR", help="write the run here instead of log.dir/name-time")
    run.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS", help="run on a Ray cluster")
    ev = sub.add_parser("eval", help="play episodes with a run's latest checkpoint")
    ev.add_argument("run_dir")
    ev.add_argument("--episodes", type=int, default=10)
    ev.add_argument("--video", metavar="PATH", help="record the first episode to this video file")
    ev.add_argument("--stochastic", action="store_true", help="sample actions instead of taking the mode")
    ev.add_argument("--seed", type=int, default=0)
    cats = sub.add_parser("calibrate-cats", help="CATS thresholds for a language-model run's checkpoint")
    cats.add_argument("run_dir")
    cats.add_argument("--sparsity", type=float, default=0.5, help="fraction of gate activations zeroed")
    cats.add_argument("--task", default="mixed", help="text task of the prompts: addition, sort, mixed")
    cats.add_argument("--samples", type=int, default=256, help="prompts (with sampled completions)")
    cats.add_argument("--seed", type=int, default=0)
    cats.add_argument("--device", default="cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C stops `srl run` cleanly from the first instant, also when this process was started
        # with SIGINT ignored (a background job of a non-interactive shell): the controller installs
        # its own handler once the workers start, and until then KeyboardInterrupt ends with 130.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _main(argv)
    except KeyboardInterrupt:  # anywhere, argument parsing included: status 130, no traceback
        return 130


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides after an option (`srl run exp.yaml --ray auto seed=3`) are overrides too
        if args.command != "run" or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "calibrate-cats":
            return _calibrate_cats(args)
        return _eval(args)
    except SrlError as exc:
        print(f"srl: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a failure of the run itself: one line, status 1
        print(f"srl: error: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from srl.config import load_experiment
    from srl.experiment import Experiment

    overrides = list(args.overrides)
    if args.ray and "=" in args.ray:  # `--ray seed=3`: a bare --ray followed by an override
        overrides.insert(0, args.ray)
        args.ray = "auto"
    if args.resume:
        if args.config and "=" in args.config:
            overrides.insert(0, args.config)
        path = os.path.join(args.resume, "config.yaml")
        if not os.path.isdir(args.resume) or not os.path.exists(path):
            raise ConfigError("", "not a run directory (no config.yaml inside)", args.resume)
        cfg = _with_ray(load_experiment(path, overrides), args.ray)
        exp = Experiment(cfg, run_dir=args.resume, resume=True)
    else:
        if not args.config:
            raise ConfigError("", "srl run needs an experiment file (or --resume RUN_DIR)")
        cfg = _with_ray(load_experiment(args.config, overrides), args.ray)
        exp = Experiment(cfg, run_dir=args.run_dir)
    from srl.system.metrics import process_start_time

    exp.launch_time = process_start_time()  # wall_s counts from this process's start
    result = exp.run()
    print(result.final_line(), flush=True)
    return 0


def _with_ray(cfg, address: str | None):
    """``--ray [ADDRESS]`` wins over the file's ``cluster`` section; set before the run starts so
    the run directory's config.yaml records the backend that ran."""
    if address:
        cfg.cluster.backend, cfg.cluster.address = "ray", address
        cfg.cluster.validate()
    return cfg


def _eval(args) -> int:
    from srl.workers.eval import evaluate

    report = evaluate(args.run_dir, episodes=args.episodes, video=args.video,
                      deterministic=not args.stochastic, seed=args.seed)
    print(report.summary())
    return 0


def _calibrate_cats(args) -> int:
    from srl.generation.cats_calibration import calibrate_run

    try:
        path, thresholds = calibrate_run(args.run_dir, args.sparsity, args.task, args.samples,
                                         seed=args.seed, device=args.device)
    except ValueError as exc:
        raise ConfigError("", str(exc)) from None
    print(f"CATS thresholds for sparsity {args.sparsity:g} -> {path}: "
          + ", ".join(f"{t:.4g}" for t in thresholds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Python API: experiments from YAML or from objects, including user-defined classes."""
import importlib.util
import os
import subprocess
import sys

import pytest

import srl
import srl.policies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(monkeypatch):
    """Import the example as a module that spawned workers can import too (as users' code must be)."""
    examples = os.path.join(ROOT, "examples")
    monkeypatch.syspath_prepend(examples)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([examples, os.environ.get("PYTHONPATH", "")]))
    return importlib.import_module("custom_env_policy")


def test_example_script_learns_its_custom_env(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "custom_env_policy.py"), "--steps", "12000",
                           "--log-dir", str(tmp_path)], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    final = [line for line in proc.stdout.splitlines() if line.startswith("final:")][0]
    mean_return = float(final.split("mean_return=")[1].split()[0])
    assert mean_return > 0.8, final  # optimal is 0.94; a random walk rarely reaches the end


@pytest.mark.parametrize("start_method", ["spawn"])
def test_custom_classes_reach_spawned_workers(tmp_path, monkeypatch, start_method):
    example = _example(monkeypatch)
    exp = example.build(steps=2000)
    exp.config.log.dir = str(tmp_path)
    exp.config.workers.start_method = start_method
    exp.run_dir = str(tmp_path / "run")
    result = exp.run()
    assert result.env_steps >= 2000 and result.restarts == 0
    assert exp.config.env.id == "custom/Corridor-v0" and exp.config.policy.type == "LayerNormPolicy"
    import yaml

    saved = yaml.safe_load(open(os.path.join(result.run_dir, "config.yaml")))
    assert saved["policy"]["type"] == "LayerNormPolicy"


def test_from_yaml_with_overrides(tmp_path):
    exp = srl.Experiment.from_yaml(os.path.join(ROOT, "configs", "cartpole_ppo.yaml"),
                                   overrides=["seed=4", "stop.env_steps=1500", "stop.mean_return=null",
                                              f"log.dir={tmp_path}", "log.tensorboard=false"])
    assert exp.config.seed == 4
    result = exp.run()
    assert result.env_steps >= 1500 and os.path.isdir(result.run_dir)


def test_worker_that_cannot_start_fails_the_run_with_its_error(tmp_path):
    from srl.errors import SrlError

    class Broken(srl.policies.ActorCritic):
        def __init__(self, info, cfg):
            raise RuntimeError("this policy cannot be built")

    exp = srl.Experiment.from_yaml(os.path.join(ROOT, "configs", "cartpole_ppo.yaml"),
                                   overrides=[f"log.dir={tmp_path}", "log.tensorboard=false"])
    exp = srl.Experiment(exp.config, run_dir=str(tmp_path / "run"), policy=Broken)
    with pytest.raises(SrlError, match="this policy cannot be built"):
        exp.run()


def test_bad_backend_is_a_clear_error(tmp_path):
    exp = srl.Experiment.from_yaml(os.path.join(ROOT, "configs", "cartpole_ppo.yaml"), overrides=[f"log.dir={tmp_path}"])
    with pytest.raises(ValueError, match="backend"):
        exp.run(backend="slurm")


def test_workers_are_spawned_not_forked_once_this_process_holds_a_cuda_context(monkeypatch):
    """A forked child cannot use its parent's CUDA context (a second run in a session that touched
    the GPU failed that way), so the local scheduler spawns then; otherwise it keeps fork."""
    import torch

    from srl.system.local_scheduler import LocalScheduler

    scheduler = LocalScheduler("fork")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert scheduler._context().get_start_method() == "fork"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert scheduler._context().get_start_method() == "spawn"
    assert LocalScheduler("forkserver")._context().get_start_method() == "forkserver"


def test_actors_run_at_the_cpu_priority_the_config_gives_them(tmp_path):
    """workers.actors.nice reaches the actor processes (their policy is built there) and no other."""
    seen = tmp_path / "nice"
    seen.mkdir()

    class NiceProbe(srl.policies.ActorCritic):
        def __init__(self, info, cfg):
            super().__init__(info, cfg)
            (seen / str(os.getpid())).write_text(str(os.nice(0)))

    exp = srl.Experiment.from_yaml(os.path.join(ROOT, "configs", "cartpole_ppo.yaml"),
                                   overrides=[f"log.dir={tmp_path}", "log.tensorboard=false", "stop.env_steps=600",
                                              "stop.mean_return=null", "workers.actors.count=2", "workers.actors.nice=3",
                                              "workers.start_method=fork"])
    base = os.nice(0)
    result = srl.Experiment(exp.config, run_dir=str(tmp_path / "run"), policy=NiceProbe).run()
    assert result.env_steps >= 600
    values = sorted(int(f.read_text()) - base for f in seen.iterdir())
    assert values.count(min(3, 19 - base)) == 2 and values.count(0) >= 1  # two actors; the trainer unchanged

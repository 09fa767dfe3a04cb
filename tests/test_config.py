"""Every class of bad input ends with status 2 and one line naming the file and the field."""
import subprocess
import sys

import pytest

from srl.cli import main
from srl.config import load_experiment

GOOD = """
name: t
env: {id: CartPole-v1}
policy: {type: mlp}
algorithm: {type: ppo}
optimizer: {type: adam, lr: 0.001}
workers: {actors: {count: 2, envs_per_actor: 4}, policies: {count: 1}, trainers: {count: 1}}
stop: {env_steps: 1000, mean_return: 100}
seed: 3
"""


def _write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _run_cli(capsys, *args):
    code = main(["run", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_good_file_loads_with_typed_values(tmp_path):
    cfg = load_experiment(_write(tmp_path, GOOD), ["workers.actors.count=3", "optimizer.lr=0.01", "env.kwargs={}"])
    assert cfg.workers.actors.count == 3 and cfg.optimizer.lr == 0.01 and cfg.seed == 3
    assert cfg.env.id == "CartPole-v1" and cfg.workers.actors.envs_per_actor == 4
    assert isinstance(cfg.stop.mean_return, float)


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        (GOOD, ["workers.actors.cuont=2"], ["workers.actors.cuont", "did you mean 'count'"]),
        (GOOD.replace("seed: 3", "sed: 3"), [], ["sed", "did you mean 'seed'"]),
        (GOOD, ["workers.actors.count=two"], ["workers.actors.count", "must be an integer"]),
        (GOOD, ["workers.actors.count=0"], ["workers.actors.count", ">= 1"]),
        (GOOD, ["algorithm.gamma=1.5"], ["algorithm.gamma", "must be in"]),
        (GOOD, ["optimizer.lr=-1"], ["optimizer.lr", "must be in"]),
        (GOOD, ["env.id=CartPole-v9"], ["env.id", "unknown environment", "CartPole-v1"]),
        (GOOD, ["policy.type=mpl"], ["policy.type", "did you mean 'mlp'"]),
        (GOOD, ["algorithm.type=dqn"], ["algorithm.type", "unknown"]),
        (GOOD, ["optimizer.type=adamm"], ["optimizer.type", "did you mean 'adam'"]),
        (GOOD, ["workers=3"], ["workers", "must be a mapping"]),
        (GOOD, ["policy.hidden=[64, -1]"], ["policy.hidden"]),
        (GOOD, ["workers.actors.inline_policy=yes please"], ["workers.actors.inline_policy", "true or false"]),
        (GOOD, ["noequals"], ["key=value"]),
        ("- just\n- a list\n", [], ["must hold a mapping"]),
        ("name: [unclosed\n", [], ["not valid YAML"]),
        ("name: !!python/object/apply:os.system ['echo hacked']\n", [], ["not allowed", "python"]),
        ("a: &x [1]\nb: *x\n", [], ["aliases"]),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, text, overrides, expected):
    path = _write(tmp_path, text)
    code, err = _run_cli(capsys, path, *overrides)
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("srl: error:")
    assert "Traceback" not in err[0]
    assert path in err[0] or "override" in err[0]  # names where the bad value came from
    for piece in expected:
        assert piece in err[0], err[0]


def test_missing_file_and_directory(tmp_path, capsys):
    code, err = _run_cli(capsys, str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml: file not found" in err[0]
    code, err = _run_cli(capsys, str(tmp_path))
    assert code == 2 and "is a directory" in err[0]


def test_resume_of_a_non_run_directory(tmp_path, capsys):
    code, err = _run_cli(capsys, "--resume", str(tmp_path))
    assert code == 2 and "not a run directory" in err[0]


def test_alias_bomb_is_refused_without_expanding(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    code, err = _run_cli(capsys, _write(tmp_path, "\n".join(lines) + "\n"))
    assert code == 2 and "aliases" in err[0]


def test_real_process_prints_no_traceback(tmp_path):
    path = _write(tmp_path, GOOD)
    proc = subprocess.run([sys.executable, "-m", "srl.cli", "run", path, "workers.actors.count=-2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "workers.actors.count" in proc.stderr and path in proc.stderr


def test_cross_field_check_names_both_fields(tmp_path, capsys):
    code, err = _run_cli(capsys, _write(tmp_path, GOOD), "workers.actors.inline_policy=false", "workers.policies.count=0")
    assert code == 2 and "workers.policies.count" in err[0] and "inline_policy" in err[0]
    code, err = _run_cli(capsys, _write(tmp_path, GOOD), "workers.actors.ring=3")
    assert code == 2 and "workers.actors.ring" in err[0] and "envs_per_actor" in err[0]


def test_configuration_reference_is_up_to_date():
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("make_configuration", os.path.join(root, "docs", "make_configuration.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(os.path.join(root, "docs", "configuration.md")) as fh:
        assert fh.read() == module.render(), "run: python docs/make_configuration.py > docs/configuration.md"

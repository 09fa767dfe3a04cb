"""Every size field has an upper bound checked at load; the one-line error names the field and,
where it matters, the memory the value would need."""
import pytest

from srl.cli import main
from srl.config import MAX_TRAJECTORY_BYTES, MIN_STEP_BYTES, SIZE_LIMITS, experiment_from_dict
from srl.errors import ConfigError

BASE = {"name": "t", "env": {"id": "CartPole-v1"}, "stop": {"env_steps": 1000}}


def _set(data, dotted, value):
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _companions(name, value):
    """Other fields a value at the limit needs to be valid on its own."""
    extra = {}
    if name == "workers.actors.ring":
        extra["workers.actors.envs_per_actor"] = value  # ring must divide envs_per_actor
    if name == "workers.actors.envs_per_actor":
        extra["workers.actors.rollout_len"] = 8
    if name == "workers.actors.rollout_len":
        extra["workers.actors.envs_per_actor"] = 8
    if name == "algorithm.minibatches":
        extra["algorithm.batch_size"] = value
    return extra


def _with(name, value):
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for dotted, v in {name: value, **_companions(name, value if not isinstance(value, list) else 0)}.items():
        _set(data, dotted, v)
    return data


@pytest.mark.parametrize("name", sorted(set(SIZE_LIMITS) - {"workers.trainers.count", "policy.hidden"}))
def test_each_size_field_accepts_its_limit_and_refuses_one_more(name):
    limit = SIZE_LIMITS[name]
    cfg = experiment_from_dict(_with(name, limit))  # the bound itself is fine
    node = cfg
    for part in name.split("."):
        node = getattr(node, part)
    assert node == limit
    with pytest.raises(ConfigError) as err:
        experiment_from_dict(_with(name, limit + 1))
    assert name in str(err.value) and f"<= {limit}" in str(err.value)


def test_trainer_count_is_bounded():
    with pytest.raises(ConfigError, match="workers.trainers.count"):
        experiment_from_dict(_with("workers.trainers.count", SIZE_LIMITS["workers.trainers.count"] + 1))


def test_huge_envs_per_actor_names_the_field_and_the_memory(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("name: t\nstop: {env_steps: 1000}\nworkers: {actors: {envs_per_actor: 1000000000000}}\n")
    code = main(["run", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "workers.actors.envs_per_actor" in err[0] and "1000000000000" in err[0]
    assert "TiB" in err[0] and str(path) in err[0]


@pytest.mark.parametrize("fields, field, words", [
    ({"workers.actors.rollout_len": 10**9}, "workers.actors.rollout_len", "trajectories"),
    ({"workers.policies.max_batch": 10**12}, "workers.policies.max_batch", "forward pass"),
    ({"algorithm.batch_size": 10**12}, "algorithm.batch_size", "TiB"),
    ({"workers.actors.count": 10**6}, "workers.actors.count", "process"),
    ({"policy.hidden": [64, 10**7]}, "policy.hidden", "<="),
    ({"policy.hidden": [8] * 65}, "policy.hidden", "layers"),
    ({"policy.hidden": [30000, 30000, 30000]}, "policy.hidden", "GiB"),  # each width fine, the product not
    ({"seed": 2**40}, "seed", "<="),
    ({"stop.env_steps": 2**63}, "stop.env_steps", "<="),
    ({"checkpoint.keep": 10**9}, "checkpoint.keep", "<="),
])
def test_oversized_values_name_field_and_need(fields, field, words):
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for dotted, value in fields.items():
        _set(data, dotted, value)
    with pytest.raises(ConfigError) as err:
        experiment_from_dict(data)
    assert err.value.field == field and words in str(err.value), str(err.value)


def test_product_of_in_bounds_sizes_is_bounded():
    envs, rollout = SIZE_LIMITS["workers.actors.envs_per_actor"], SIZE_LIMITS["workers.actors.rollout_len"]
    assert envs * (rollout + 1) * MIN_STEP_BYTES > MAX_TRAJECTORY_BYTES  # each alone passes, together not
    data = _with("workers.actors.envs_per_actor", envs)
    _set(data, "workers.actors.rollout_len", rollout)
    with pytest.raises(ConfigError, match="GiB of trajectories per actor"):
        experiment_from_dict(data)


@pytest.mark.parametrize("dotted, value", [
    ("optimizer.lr", float("nan")),
    ("stop.mean_return", float("inf")),
    ("workers.heartbeat_timeout_s", float("nan")),
    ("algorithm.gamma", float("nan")),
])
def test_non_finite_floats_are_refused(dotted, value):
    data = _with(dotted, value)
    with pytest.raises(ConfigError) as err:
        experiment_from_dict(data)
    assert err.value.field == dotted


def test_shipped_configs_stay_within_bounds():
    import glob
    import os

    from srl.config import load_experiment

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    files = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert files
    for path in files:
        try:
            load_experiment(path)
        except ConfigError as exc:
            assert "<=" not in str(exc) and "finite" not in str(exc), exc  # other checks may need extras

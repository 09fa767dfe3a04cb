"""Checkpoint corruption: each fault falls back to the newest intact checkpoint with a warning,
or ends in one line when none is intact; non-finite weights are refused at save and at load."""
import json
import logging
import os

import pytest
import torch

from srl.errors import SrlError
from srl.system import checkpoint as ck


def _weights(seed):
    g = torch.Generator().manual_seed(seed)
    return {"pi.weight": torch.randn(8, 4, generator=g), "pi.bias": torch.randn(8, generator=g),
            "steps": torch.tensor([seed], dtype=torch.int64)}


def _save(run_dir, version, keep=5):
    state = {"opt": {"step": torch.tensor(float(version))}, "lr": 1e-3}
    return ck.save_checkpoint(str(run_dir), version, _weights(version), state,
                              {"env_steps": 100 * version, "episodes": version}, keep=keep)


@pytest.fixture
def run3(tmp_path):
    """A run directory with checkpoints at versions 10, 20 and 30."""
    paths = {v: _save(tmp_path, v) for v in (10, 20, 30)}
    return tmp_path, paths


def _assert_loaded(ckpt, version):
    assert ckpt is not None and ckpt.version == version and ckpt.counters["version"] == version
    assert ckpt.counters["env_steps"] == 100 * version
    for k, v in _weights(version).items():
        assert torch.equal(ckpt.weights[k], v)
    assert float(ckpt.trainer_state["opt"]["step"]) == version


def test_intact_checkpoints_load_the_newest(run3):
    run_dir, _ = run3
    ckpt = ck.load_latest(str(run_dir))
    _assert_loaded(ckpt, 30)
    assert ckpt.skipped == []
    assert ck.has_checkpoint(str(run_dir))
    manifest = json.loads(open(os.path.join(ckpt.path, "manifest.json")).read())
    assert set(manifest["files"]) == {"model.safetensors", "trainer.pt", "counters.json"}


def _truncate_weights(path):
    f = os.path.join(path, "model.safetensors")
    os.truncate(f, os.path.getsize(f) // 2)


def _garble_counters(path):
    with open(os.path.join(path, "counters.json"), "w") as fh:
        fh.write('{"env_steps": 3000, "versi')


def _garble_counters_and_manifest(path):
    """The manifest agrees with the garbled file: the JSON check must still catch it."""
    _garble_counters(path)
    m = os.path.join(path, "manifest.json")
    manifest = json.load(open(m))
    f = os.path.join(path, "counters.json")
    manifest["files"]["counters.json"] = {"size": os.path.getsize(f), "sha256": ck._sha256(f)}
    json.dump(manifest, open(m, "w"))


def _flip_weight_byte(path):
    f = os.path.join(path, "model.safetensors")
    data = bytearray(open(f, "rb").read())
    data[-3] ^= 0x40
    open(f, "wb").write(bytes(data))


def _remove(fname):
    return lambda path: os.remove(os.path.join(path, fname))


def _bad_manifest(path):
    open(os.path.join(path, "manifest.json"), "w").write("[1, 2")


def _nan_weights_behind_the_manifest(path):
    """NaN weights written with a matching manifest (a trainer that diverged, saved by old code)."""
    weights = _weights(30)
    weights["pi.weight"][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(weights, os.path.join(path, "model.safetensors"))
    ck._write_manifest(path, 30)


FAULTS = {
    "truncated weights": (_truncate_weights, "model.safetensors"),
    "garbled counters.json": (_garble_counters, "counters.json"),
    "garbled counters.json, manifest rewritten": (_garble_counters_and_manifest, "counters.json"),
    "flipped weight byte": (_flip_weight_byte, "checksum"),
    "missing weights": (_remove("model.safetensors"), "missing"),
    "missing trainer state": (_remove("trainer.pt"), "missing"),
    "missing manifest": (_remove("manifest.json"), "manifest"),
    "garbled manifest": (_bad_manifest, "manifest"),
    "nan weights": (_nan_weights_behind_the_manifest, "nan"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_corrupt_newest_checkpoint_falls_back_with_a_warning(run3, caplog, fault):
    run_dir, paths = run3
    corrupt, words = FAULTS[fault]
    corrupt(paths[30])
    with caplog.at_level(logging.WARNING, logger="srl.system.checkpoint"):
        ckpt = ck.load_latest(str(run_dir))
    _assert_loaded(ckpt, 20)
    assert len(ckpt.skipped) == 1 and ckpt.skipped[0].startswith("ckpt-000000030:")
    assert words in ckpt.skipped[0] and "\n" not in ckpt.skipped[0]
    assert any("ckpt-000000030" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_two_corrupt_checkpoints_fall_back_to_the_oldest(run3):
    run_dir, paths = run3
    _truncate_weights(paths[30])
    _garble_counters(paths[20])
    ckpt = ck.load_latest(str(run_dir))
    _assert_loaded(ckpt, 10)
    assert [s.split(":")[0] for s in ckpt.skipped] == ["ckpt-000000030", "ckpt-000000020"]


def test_latest_pointer_is_not_trusted(run3):
    run_dir, paths = run3
    latest = os.path.join(str(run_dir), "checkpoints", "latest")
    with open(latest, "w") as fh:
        fh.write("ckpt-000000099")  # names a folder that does not exist
    _assert_loaded(ck.load_latest(str(run_dir)), 30)
    with open(latest, "w") as fh:
        fh.write("ckpt-000000010")  # names an older one
    _assert_loaded(ck.load_latest(str(run_dir)), 30)
    os.remove(latest)  # deleted: the run must not restart from zero
    _assert_loaded(ck.load_latest(str(run_dir)), 30)


def test_none_intact_raises_one_line_and_none_at_all_returns_none(run3, tmp_path_factory):
    run_dir, paths = run3
    for path in paths.values():
        _truncate_weights(path)
    assert not ck.has_checkpoint(str(run_dir))
    with pytest.raises(SrlError) as err:
        ck.load_latest(str(run_dir))
    line = str(err.value)
    assert "\n" not in line and "no usable checkpoint" in line and "ckpt-000000030" in line
    empty = tmp_path_factory.mktemp("fresh")
    assert ck.load_latest(str(empty)) is None and not ck.has_checkpoint(str(empty))
    os.makedirs(os.path.join(str(empty), "checkpoints", ".ckpt-000000005.tmp-123"))  # a crashed save
    assert ck.load_latest(str(empty)) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_save_refuses_non_finite_weights_and_writes_nothing(tmp_path, bad):
    _save(tmp_path, 10)
    weights = _weights(20)
    weights["pi.bias"][3] = bad
    with pytest.raises(ValueError, match="pi.bias"):
        ck.save_checkpoint(str(tmp_path), 20, weights, {}, {})
    assert [v for v, _ in ck.list_checkpoints(str(tmp_path))] == [10]
    _assert_loaded(ck.load_latest(str(tmp_path)), 10)


def test_resaving_a_version_and_pruning_keep_intact_copies(tmp_path):
    for v in (1, 2, 3, 4):
        _save(tmp_path, v, keep=2)
    assert [v for v, _ in ck.list_checkpoints(str(tmp_path))] == [4, 3]
    _save(tmp_path, 4, keep=2)  # the same version again (a restarted trainer)
    _assert_loaded(ck.load_latest(str(tmp_path)), 4)
    leftovers = [n for n in os.listdir(os.path.join(str(tmp_path), "checkpoints")) if n.startswith(".")]
    assert leftovers == []


def test_eval_reports_an_unusable_checkpoint_in_one_line(tmp_path, capsys):
    pytest.importorskip("gymnasium")
    from srl.cli import main
    from srl.config import ExperimentConfig, dump_yaml

    cfg = ExperimentConfig()
    cfg.stop.env_steps = 100
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    path = _save(tmp_path, 5)
    _truncate_weights(path)
    code = main(["eval", str(tmp_path), "--episodes", "1"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("srl")]
    assert code == 2 and len(err) == 1 and "no usable checkpoint" in err[0], err
    # weights of another shape than config.yaml's policy: one line as well
    _save(tmp_path, 6)
    code = main(["eval", str(tmp_path), "--episodes", "1"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("srl")]
    assert code == 2 and len(err) == 1 and "do not fit" in err[0], err


def test_an_unwritable_run_dir_is_one_line_and_leaves_nothing_behind(tmp_path):
    _save(tmp_path, 10)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the run directory should be")
    with pytest.raises(SrlError) as err:
        _save(blocker, 11)
    assert "\n" not in str(err.value) and "not_a_dir" in str(err.value)
    # the checkpoints folder itself replaced by a file: save fails in one line, load says so too
    run = tmp_path / "run2"
    run.mkdir()
    (run / "checkpoints").write_text("")
    with pytest.raises(SrlError, match="checkpoint"):
        _save(run, 3)
    assert ck.load_latest(str(run)) is None

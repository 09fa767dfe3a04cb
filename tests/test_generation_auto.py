"""generation.mode auto: the measured table, the pick per batch size, config checks, and the
generation worker's sampler factory building the picked sampler."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from srl.config import ConfigError, GenerationConfig
from srl.generation import PlainSampler, SpeculativeSampler
from srl.generation.auto import DEFAULT_TABLE, ModeChoice, check_table, load_table, pick, table_from_rows
from srl.policies.lm import LMConfig, TransformerLM

TABLE = [{"batch": 1, "mode": "spectr", "k": 4, "draft_len": 7},
         {"batch": 16, "mode": "standard", "k": 1, "draft_len": 5},
         {"batch": 64, "mode": "plain"}]


def test_pick_nearest_batch_in_log_scale():
    t = check_table(TABLE)
    assert pick(t, 1) == ModeChoice("spectr", 4, 7)
    assert pick(t, 3) == ModeChoice("spectr", 4, 7)  # log 3 nearer to log 1 than to log 16
    assert pick(t, 5) == ModeChoice("standard", 1, 5)
    assert pick(t, 4) == ModeChoice("spectr", 4, 7)  # exactly between 1 and 16: the smaller
    assert pick(t, 32) == ModeChoice("standard", 1, 5)  # exactly between 16 and 64: the smaller
    assert pick(t, 33) == ModeChoice("plain")
    assert pick(t, 1024) == ModeChoice("plain")
    assert pick(check_table([{"batch": 8, "mode": "standard", "k": 3, "draft_len": 2}]), 8).k == 1


def test_pick_tie_takes_smaller_batch():
    t = check_table([{"batch": 2, "mode": "plain"}, {"batch": 8, "mode": "standard", "k": 1, "draft_len": 3}])
    assert pick(t, 4).mode == "plain"  # log 4 is exactly between log 2 and log 8
    assert pick(t, 5).mode == "standard"


def test_table_from_rows_takes_fastest_mode():
    rows = [{"batch": 1, "method": "plain", "k": 0, "L": 0, "tokens_per_s": 100.0},
            {"batch": 1, "method": "plain_eager", "k": 0, "L": 0, "tokens_per_s": 900.0},
            {"batch": 1, "method": "spectr", "k": 4, "L": 5, "tokens_per_s": 250.0},
            {"batch": 1, "method": "standard", "k": 1, "L": 7, "tokens_per_s": 240.0},
            {"batch": 64, "method": "plain", "k": 0, "L": 0, "tokens_per_s": 9000.0},
            {"batch": 64, "method": "standard", "k": 1, "L": 5, "tokens_per_s": 8000.0}]
    t = table_from_rows(rows)
    assert [(e["batch"], e["mode"], e["k"], e["draft_len"]) for e in t] == [(1, "spectr", 4, 5), (64, "plain", 1, 1)]
    assert pick(check_table(t), 2) == ModeChoice("spectr", 4, 5)


def test_bad_tables_and_config(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        check_table([{"batch": 1, "mode": "fast"}])
    with pytest.raises(ValueError, match="draft_len"):
        check_table([{"batch": 1, "mode": "spectr", "k": 2}])
    with pytest.raises(ValueError, match="non-empty"):
        check_table([])
    check_table(DEFAULT_TABLE)
    GenerationConfig(mode="auto").validate()
    with pytest.raises(ConfigError, match="generation.mode"):
        GenerationConfig(mode="fastest").validate()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"auto_table": [{"batch": 0, "mode": "plain"}]}))
    with pytest.raises(ConfigError, match="generation.auto_table"):
        GenerationConfig(mode="auto", auto_table=str(bad)).validate()
    with pytest.raises(ConfigError, match="generation.auto_table"):
        GenerationConfig(mode="auto", auto_table=str(tmp_path / "missing.json")).validate()
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"rows": [], "auto_table": TABLE}))  # a benchmark output file
    GenerationConfig(mode="auto", auto_table=str(good)).validate()
    assert load_table(str(good))[0]["mode"] == "spectr"


def test_make_sampler_builds_the_pick(tmp_path):
    from srl.workers.generation import make_sampler

    path = tmp_path / "table.json"
    path.write_text(json.dumps(TABLE))
    gen = GenerationConfig(mode="auto", auto_table=str(path), cuda_graph=False)
    cfg = SimpleNamespace(generation=gen)
    torch.manual_seed(0)
    policy = TransformerLM(LMConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, max_seq_len=128)).eval()
    draft = TransformerLM(LMConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=1, max_seq_len=128)).eval()
    s1 = make_sampler(cfg, policy, draft, 1, 4, 8)
    assert isinstance(s1, SpeculativeSampler) and (s1.k, s1.L) == (4, 7)
    s16 = make_sampler(cfg, policy, draft, 16, 4, 8)
    assert isinstance(s16, SpeculativeSampler) and (s16.k, s16.L) == (1, 5)
    s64 = make_sampler(cfg, policy, draft, 64, 4, 8)
    assert isinstance(s64, PlainSampler)
    out = s1.generate(torch.randint(0, 16, (1, 4)), 8)
    assert out.tokens.shape == (1, 8)


def test_default_table_is_what_the_device_measured():
    """DEFAULT_TABLE's picks are the fastest modes in the committed H200 results it cites."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
    with open(os.path.join(root, "generation_spec_h200_roundD.json")) as fh:
        measured = {e["batch"]: e for e in table_from_rows(json.load(fh)["rows"])}
    for entry in DEFAULT_TABLE:
        got, want = pick(DEFAULT_TABLE, entry["batch"]), measured[entry["batch"]]
        assert got == pick([want], entry["batch"]), (entry, want)
    # negative control: batch 1's old entry (plain) is not what the device measured there
    assert pick([measured[1]], 1) != ModeChoice("plain")

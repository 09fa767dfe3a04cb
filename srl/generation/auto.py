"""``generation.mode: auto``: plain, standard or SpecTr k per batch size, from a measured table.

Speculation pays at small batches (the target's weights are read once for several tokens) and
stops paying as the batch grows (the verification pass and SpecTr's k draft rows stop being
nearly free), and where the crossing lies depends on the device, the models and how well the
draft is aligned. So the choice is measured, not modelled: ``benchmarks/generation.py --auto``
times every mode on the device and writes a table (``table_from_rows``), one entry per batch
size: ``{"batch": 16, "mode": "standard", "k": 1, "draft_len": 7, "tokens_per_s": ...}``.
``pick`` takes the entry whose batch size is nearest in log scale (the smaller one on a tie).

``DEFAULT_TABLE`` holds the H200 measurement of the 123.6M policy and its 10.5M draft
(docs/benchmarks.md); ``generation.auto_table`` names a JSON file of another measurement.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

MODES = ("plain", "standard", "spectr")

DEFAULT_TABLE: list[dict] = [
    {"batch": 1, "mode": "standard", "k": 1, "draft_len": 7},
    {"batch": 16, "mode": "standard", "k": 1, "draft_len": 7},
    {"batch": 64, "mode": "plain", "k": 1, "draft_len": 1},
]
"""H200 measurement with a trained pair (held-out acceptance 0.97), one grid of
``benchmarks/generation.py --auto`` (benchmarks/results/generation_spec_h200_roundD.json): batch 1
standard L = 7 at 7,268 tok/s (the fused iteration; plain 2,601, SpecTr k = 4 2,963); batch 16
standard L = 7 at 40,012 (plain 31,531, SpecTr 32,380); batch 64 plain at 106,990 (standard
106,795, SpecTr 60,884). A draft that follows its policy less well shifts the table toward
plain: measure it (``generation.auto_table``)."""


@dataclass(frozen=True)
class ModeChoice:
    mode: str
    k: int = 1
    draft_len: int = 1

    def describe(self) -> str:
        if self.mode == "plain":
            return "plain"
        return f"{self.mode} k={self.k} draft_len={self.draft_len}"


def check_table(table: list[dict], source: str = "auto table") -> list[dict]:
    """The table sorted by batch; ValueError naming the bad entry otherwise."""
    if not isinstance(table, list) or not table:
        raise ValueError(f"{source}: must be a non-empty list of entries")
    for e in table:
        if not isinstance(e, dict) or int(e.get("batch", 0)) < 1 or e.get("mode") not in MODES:
            raise ValueError(f"{source}: entry {e!r} needs batch >= 1 and mode in {MODES}")
        if e["mode"] != "plain" and (int(e.get("k", 0)) < 1 or int(e.get("draft_len", 0)) < 1):
            raise ValueError(f"{source}: entry {e!r} needs k >= 1 and draft_len >= 1")
    return sorted(table, key=lambda e: int(e["batch"]))


def load_table(path: str | None) -> list[dict]:
    """The table in ``path`` (a JSON list, or an object with an ``auto_table`` list), or the default."""
    if path is None:
        return check_table(DEFAULT_TABLE, "DEFAULT_TABLE")
    with open(path) as fh:
        data = json.load(fh)
    if isinstance(data, dict):
        data = data.get("auto_table")
    return check_table(data, path)


def pick(table: list[dict], batch: int) -> ModeChoice:
    """The entry for the batch size nearest to ``batch`` in log scale (ties: the smaller)."""
    best = min(table, key=lambda e: (round(abs(math.log(int(e["batch"]) / max(batch, 1))), 9),
                                     int(e["batch"])))
    if best["mode"] == "plain":
        return ModeChoice("plain")
    k = 1 if best["mode"] == "standard" else int(best["k"])
    return ModeChoice(best["mode"], k, int(best["draft_len"]))


def table_from_rows(rows: list[dict]) -> list[dict]:
    """Fastest mode per batch size from benchmark rows (batch, method, k, L, tokens_per_s)."""
    table = []
    for b in sorted({r["batch"] for r in rows}):
        cands = [r for r in rows if r["batch"] == b and r["method"] in MODES]
        if not cands:
            continue
        r = max(cands, key=lambda r: r["tokens_per_s"])
        table.append({"batch": b, "mode": r["method"], "k": max(int(r["k"]), 1),
                      "draft_len": max(int(r["L"]), 1), "tokens_per_s": r["tokens_per_s"]})
    return table

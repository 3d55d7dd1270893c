"""The benchmark code runs (`make bench` must not rot between the sessions that measure with it).

Tiny sizes only: these check that every row is produced and that the cache-format tables hold
together, not any speed. The figures themselves live in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_bench_suite_produces_every_row_at_tiny_sizes(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.run", "--rows", "1,2,3,4,5", "--vocab", "512", "--n", "16",
           "--presets", "kd,abkd,amid", "--repeat", "1", "--warmup", "0", "--zipf", "--cache-positions", "3000",
           "--teacher-positions", "500", "--step-vocab", "512", "--json", str(out)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {str(r["table"]) for r in rows} == {"1", "2", "3", "4", "5"}
    for r in rows:
        if r.get("a_s") and r.get("b_s"):
            assert math.isfinite(r["a_s"] / r["b_s"]) and r["a_s"] > 0, r
    assert "| 5 |" in res.stdout  # the printed table


def _synthetic_teacher(V: int, positions: int = 400, seed: int = 0) -> dict:
    from amid.teacher import teacher_topk

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(positions, V, generator=g) * 3
    ids, lps, tail = teacher_topk(logits, 64)
    examples, start, ex_id = [], 0, 0
    while start < positions:
        p = min(37, positions - start)
        examples.append((ex_id, list(range(p + 3)), list(range(2, p + 2))))
        start, ex_id = start + p, ex_id + 1
    return {"vocab": f"synthetic{V}", "V": V, "examples": examples, "ids": ids.numpy(), "lps": lps.numpy(),
            "tail": tail.numpy()}


@pytest.mark.parametrize("V", [300, 70_000])  # uint16 and uint32 ids
def test_cache_format_tables_hold_together(V, tmp_path):
    from benchmarks.cache_format import markdown, precision_table, size_table

    t = _synthetic_teacher(V)
    sizes = size_table(t, tmp_path)  # asserts internally that it rebuilds the writer's bytes
    by_name = {r["variant"]: r for r in sizes}
    chosen = next(r for r in sizes if r["variant"].startswith("**chosen**"))
    naive = by_name["naive int32 ids + float32 log-probs + float32 tail, raw"]
    assert naive["bytes_per_position"] == pytest.approx(516.0, abs=0.5)
    assert chosen["bytes_per_position"] < naive["bytes_per_position"] and chosen["read_pos_per_s"] > 0
    prec = precision_table(t, n=64)
    assert prec["per_bits"][8]["worst_loss_rel"] < 1e-3
    text = markdown([{"vocab": t["vocab"], "V": V, "positions": len(t["tail"]), "examples": len(t["examples"]),
                      "mean_tail_mass": 0.5, "mean_top1_prob": 0.1, "sizes": sizes, "precision": prec,
                      "bytes_per_position": chosen["bytes_per_position"], "write_pos_per_s": 1.0,
                      "decode_pos_per_s": None, "decode_pos_per_s_noverify": None, "decode_cache_positions": None}])
    assert "**chosen**" in text and np.isfinite(chosen["bytes_per_position"])


def test_accuracy_table_runs_and_shows_float32_close_to_float64():
    cmd = [sys.executable, "-m", "benchmarks.accuracy", "--n", "6", "--vocab", "200", "--top-k", "4",
           "--presets", "rkl,abkd", "--offsets", "0,10000"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines() if line.startswith("| random") or
            line.startswith("| opposed")]
    assert len(rows) == 2 * 2 * 2
    assert max(float(cell) for row in rows for cell in row[3:]) < 1e-4  # every error column

"""`amid sweep`: one cache, many runs; finished runs are skipped, failures recorded."""

from __future__ import annotations

import csv
import json

import pytest

from amid.sweep import SweepConfig, expand_grid, run_sweep
from test_train import world  # noqa: F401  (the shared tiny teacher/cache/student fixture)

TRAIN = {"max_steps": 3, "batch_size": 8, "lr": 5e-3, "warmup_steps": 0, "eval_fraction": 0.2,
         "eval_every": 1000, "save_every": 1000, "device": "cpu", "dtype": "fp32", "progress": False,
         "num_workers": 1, "shuffle_buffer": 32}


def test_grid_expansion():
    cfg = SweepConfig(cache="c", student="s", out="o", presets=("kd", "amid", "ce"), alphas=(-1.0, 0.5),
                      lams=(0.1, 0.5), orders=("pr", "rq"))
    runs = expand_grid(cfg)
    assert [r["name"] for r in runs if r["preset"] != "amid"] == ["kd", "ce"]
    amid = [r for r in runs if r["preset"] == "amid"]
    assert len(amid) == 2 * 2 * 2
    assert len({r["name"] for r in runs}) == len(runs)
    assert {"alpha": -1.0, "lam": 0.5, "divergence": "kl", "order": "rq"} in [r["loss"] for r in amid]


def _rows(out):
    with open(out / "results.csv") as fh:
        return {r["run"]: r for r in csv.DictReader(fh)}


@pytest.mark.slow
def test_sweep_runs_skips_finished_and_records_failures(world, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    cfg = SweepConfig(cache=world["cache"], student=world["student"], out=str(out), presets=("kd", "amid"),
                      alphas=(0.5, 2.0), train_overrides=TRAIN)
    messages: list[str] = []
    table = run_sweep(cfg, log=messages.append)
    rows = _rows(out)
    assert set(rows) == {"kd", "amid_a0.5_l0.1_kl_pr", "amid_a2_l0.1_kl_pr"}
    assert all(r["status"] == "ok" and float(r["eval_kl"]) > 0 for r in rows.values())
    assert "amid_a2_l0.1_kl_pr" in table and (out / "results.md").exists() and (out / "sweep.png").stat().st_size > 0
    assert any("Cost:" in m for m in messages)

    # A sweep stopped in the middle: one run never finished. Restarting runs only that one.
    (out / "runs" / "kd" / "result.json").unlink()
    kept = (out / "runs" / "amid_a0.5_l0.1_kl_pr" / "result.json").read_text()
    messages.clear()
    run_sweep(cfg, log=messages.append)
    assert any("2 already finished, 1 to run" in m for m in messages)
    assert (out / "runs" / "amid_a0.5_l0.1_kl_pr" / "result.json").read_text() == kept
    assert _rows(out)["kd"]["status"] == "ok"

    # A run that fails (λ out of range) is recorded; the others are unaffected.
    bad = SweepConfig(cache=world["cache"], student=world["student"], out=str(out), presets=("kd", "amid"),
                      alphas=(0.5,), lams=(0.1, 2.0), train_overrides=TRAIN)
    run_sweep(bad, log=messages.append)
    rows = _rows(out)
    assert rows["amid_a0.5_l2_kl_pr"]["status"] == "failed"
    assert "lam" in rows["amid_a0.5_l2_kl_pr"]["error"]
    assert rows["kd"]["status"] == "ok"
    result = json.loads((out / "runs" / "amid_a0.5_l2_kl_pr" / "result.json").read_text())
    assert result["status"] == "failed"


def test_sweep_under_torchrun_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="without torchrun"):
        run_sweep(SweepConfig(cache="c", student="s", out=str(tmp_path / "sweep")), log=lambda m: None)
    assert not (tmp_path / "sweep").exists()

"""`amid sweep`: one cache, many runs; finished runs are skipped, failures recorded."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from amid.sweep import SweepConfig, expand_grid, failed_runs, run_sweep
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

    # Settings that would fail every time are refused before anything is written or started.
    before = (out / "results.csv").read_text()
    for bad, needle in [(dict(lams=(0.1, 2.0)), "run amid_a0.5_l2_kl_pr: .*lam"),
                        (dict(presets=("kd", "foo")), "run foo.*unknown preset"),
                        (dict(train_overrides={**TRAIN, "max_step": 20}), "--train-arg max_step: not a training setting"),
                        (dict(train_overrides={**TRAIN, "lr": 1e-4}), "trained with other settings.*kd \\(lr\\)"),
                        (dict(cache=str(tmp_path / "nope")), "not an amid cache")]:
        with pytest.raises((ValueError, RuntimeError), match=needle):
            run_sweep(dataclasses.replace(cfg, **bad), log=messages.append)
    assert (out / "results.csv").read_text() == before and not (out / "runs" / "amid_a0.5_l2_kl_pr").exists()

    # A run that fails while it runs (its directory holds a model, which train refuses to
    # overwrite) is recorded; the others are unaffected, and failed_runs names it.
    grid = dataclasses.replace(cfg, alphas=(0.5, 1.0))
    (out / "runs" / "amid_a1_l0.1_kl_pr").mkdir()
    (out / "runs" / "amid_a1_l0.1_kl_pr" / "config.json").write_text('{"model_type": "llama"}')
    run_sweep(grid, log=messages.append)
    rows = _rows(out)
    assert rows["amid_a1_l0.1_kl_pr"]["status"] == "failed"
    assert "not an amid run" in rows["amid_a1_l0.1_kl_pr"]["error"]
    assert rows["kd"]["status"] == rows["amid_a0.5_l0.1_kl_pr"]["status"] == "ok"
    assert failed_runs(grid) == ["amid_a1_l0.1_kl_pr"]

    # Other evaluation settings only: the finished runs are evaluated again, not retrained.
    kd_log = (out / "runs" / "kd" / "metrics.jsonl").read_text()
    extra = tmp_path / "extra.jsonl"
    extra.write_text((Path(world["root"]) / "data.jsonl").read_text())
    messages.clear()
    run_sweep(dataclasses.replace(cfg, eval_data=str(extra)), log=messages.append)
    assert any("0 already finished, 3 to run" in m for m in messages)
    rows = _rows(out)
    assert all(r["status"] == "ok" and float(r["test_ppl"]) > 1 for r in rows.values()), rows
    assert (out / "runs" / "kd" / "metrics.jsonl").read_text() == kd_log


def test_sweep_under_torchrun_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="without torchrun"):
        run_sweep(SweepConfig(cache="c", student="s", out=str(tmp_path / "sweep")), log=lambda m: None)
    assert not (tmp_path / "sweep").exists()


def test_a_chat_cache_evaluated_with_a_student_without_chat_template_is_refused_up_front(world, tmp_path):  # noqa: F811
    import shutil

    cache = tmp_path / "chat_cache"
    shutil.copytree(world["cache"], cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["data"]["template"] = "chat"  # as if built with --template chat
    (cache / "manifest.json").write_text(json.dumps(manifest))
    cfg = SweepConfig(cache=str(cache), student=world["student"], out=str(tmp_path / "sweep"), presets=("kd",),
                      eval_data=str(tmp_path / "test.jsonl"), train_overrides={"max_steps": 1, "device": "cpu"})
    with pytest.raises(ValueError, match="--template chat, and the student .* has no chat template"):
        run_sweep(cfg, log=lambda m: None)
    assert not (tmp_path / "sweep").exists()


def test_sweep_cli_takes_train_flags_as_keys_and_refuses_before_writing(world, tmp_path):  # noqa: F811
    from click.testing import CliRunner

    from amid.cli import main

    out = tmp_path / "sweep"
    base = ["sweep", "--cache", world["cache"], "--student", world["student"], "--out", str(out), "--preset", "kd"]
    res = CliRunner().invoke(main, [*base, "--train-arg", "max-steps=0"])  # the flag's spelling, not the field's
    assert res.exit_code == 1 and "--max-steps must be at least 1" in res.stderr and "Traceback" not in res.output
    res = CliRunner().invoke(main, [*base, "--train-arg", "--warmup=-1"])  # --warmup is the field warmup_steps
    assert res.exit_code == 1 and "--warmup must be at least 0" in res.stderr
    res = CliRunner().invoke(main, [*base, "--train-arg", "alpha=1"])
    assert res.exit_code == 1 and "--train-arg alpha: set by the sweep itself" in res.stderr
    res = CliRunner().invoke(main, [*base, "--train-arg", "resume=true"])
    assert res.exit_code == 1 and "the sweep always resumes" in res.stderr
    res = CliRunner().invoke(main, [*base, "--train-arg", "fused=maybe"])  # a bool setting
    assert res.exit_code == 2 and "--train-arg fused takes true or false" in res.output
    assert not out.exists()


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_with_checkpoints_and_a_rerun_finishes_it(world, tmp_path):  # noqa: F811
    # As a terminal delivers Ctrl-C: to the sweep and its running child at once (one process group).
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sweep"
    train_args = [f"--train-arg={k}={json.dumps(v)}" for k, v in
                  {**TRAIN, "max_steps": 200, "log_every": 1, "save_every": 1000}.items()]
    args = [sys.executable, "-m", "amid.cli", "sweep", "--cache", world["cache"], "--student", world["student"],
            "--out", str(out), "--preset", "kd,ce", *train_args]
    proc = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = out / "runs" / "kd" / "metrics.jsonl"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if first.exists() and '"loss"' in first.read_text():
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "kd: stopped (Stopped: SIGINT at step" in err, err
    assert err.strip().splitlines()[-1].startswith(
        f"Stopped: {out}: SIGINT: 0 of 2 runs finished this time (1 stopped with their checkpoints)"), err
    assert not (out / "runs" / "kd" / "result.json").exists()  # not recorded as failed
    stopped_at = torch.load(out / "runs" / "kd" / "checkpoint" / "trainer_state.pt", weights_only=False)["step"]
    assert not (out / "runs" / "ce" / "metrics.jsonl").exists()  # never started

    cfg = SweepConfig(cache=world["cache"], student=world["student"], out=str(out), presets=("kd", "ce"),
                      train_overrides={**TRAIN, "max_steps": 200, "log_every": 1, "save_every": 1000})
    messages: list[str] = []
    run_sweep(cfg, log=messages.append)
    assert any("0 already finished, 2 to run" in m for m in messages)
    assert all(r["status"] == "ok" for r in _rows(out).values())
    steps = [json.loads(line)["step"] for line in first.read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, 201)) and stopped_at < 200

"""`amid sweep`: one cache, many runs; finished runs are skipped, failures recorded."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
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
    # As a terminal delivers Ctrl-C: to the sweep's process group (its runs have their own sessions
    # and get it from the sweep, once).
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
    assert "kd: stopped (Stopped: SIGINT at step" in err and "--resume" not in err, err  # the sweep's rerun resumes
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


def test_devices_are_checked_up_front_and_cuda_n_is_the_nth_visible_device(tmp_path, monkeypatch):
    from amid.sweep import device_slots

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_slots(()) == [(None, {}, None)]  # the training setting's device
    # The child sees only its GPU and trains on "cuda": no silent fall-back to the CPU.
    assert device_slots(("cuda:1", "cpu"), {}) == [("cuda:1", {"CUDA_VISIBLE_DEVICES": "1"}, "cuda"),
                                                   ("cpu", {}, "cpu")]
    assert device_slots(("cuda", "cuda:1"), {"CUDA_VISIBLE_DEVICES": "4,5"}) == [
        ("cuda", {"CUDA_VISIBLE_DEVICES": "4"}, "cuda"), ("cuda:1", {"CUDA_VISIBLE_DEVICES": "5"}, "cuda")]
    for devices, environ, needle in [
        (("cuda:0", "tpu:3"), {}, "--devices tpu:3: not a device; each entry is cpu, cuda or cuda:N"),
        (("bogus",), {}, "--devices bogus: not a device"),
        (("cuda:7",), {}, "--devices cuda:7: torch .* sees 2 CUDA device\\(s\\), cuda:0 to cuda:1"),
        (("cuda:2",), {"CUDA_VISIBLE_DEVICES": "4,5"}, "cuda:2: .*CUDA_VISIBLE_DEVICES=4,5, which lists 2"),
        (("cuda:0", "cuda"), {}, "--devices cuda:0 and cuda: the same device twice"),
        (("cpu", "cpu"), {}, "--devices cpu and cpu: the same device twice"),
    ]:
        with pytest.raises(ValueError, match=needle):
            device_slots(devices, environ)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--devices cuda:0: torch .* sees no CUDA device"):
        device_slots(("cuda:0",), {})
    # Refused before anything is written (and before the cache is even opened).
    cfg = SweepConfig(cache="c", student="s", out=str(tmp_path / "sweep"), devices=("cuda:7", "tpu:3", "bogus"))
    with pytest.raises(ValueError, match="--devices cuda:7"):
        run_sweep(cfg, log=lambda m: None)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_cuda_slot_without_a_gpu_fails_its_run_and_a_cpu_slot_trains_on_the_cpu(world, tmp_path, monkeypatch):  # noqa: F811
    # This process "sees" one GPU; the child's CUDA_VISIBLE_DEVICES (-1) hides every GPU, on any machine.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    out = tmp_path / "sweep"
    train = {k: v for k, v in TRAIN.items() if k != "device"}
    cfg = SweepConfig(cache=world["cache"], student=world["student"], out=str(out), presets=("kd", "ce"),
                      devices=("cuda:0", "cpu"), train_overrides=train)
    with pytest.raises(ValueError, match="--train-arg device: --devices sets each run's device"):
        run_sweep(dataclasses.replace(cfg, train_overrides=TRAIN), log=lambda m: None)
    run_sweep(cfg, log=lambda m: None)
    rows = _rows(out)
    assert rows["kd"]["status"] == "failed" and "no CUDA device" in rows["kd"]["error"], rows["kd"]
    assert rows["ce"]["status"] == "ok"
    assert json.loads((out / "runs" / "ce" / "config.json").read_text())["device"] == "cpu"


def test_eval_data_is_read_up_front_as_the_evaluation_reads_it(world, tmp_path):  # noqa: F811
    out = tmp_path / "sweep"
    cfg = SweepConfig(cache=world["cache"], student=world["student"], out=str(out), presets=("kd",),
                      train_overrides=TRAIN)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b"}\n{"text": \n')
    fields = tmp_path / "fields.jsonl"
    fields.write_text('{"question": "a", "answer": "b"}\n')
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "a b c"}\n')
    for data, rouge, needle in [(str(tmp_path / "nonexist.jsonl"), 0, "--eval-data: .*nonexist.jsonl: no such file"),
                                (str(bad), 0, f"--eval-data: {bad}:2"),
                                (str(fields), 0, "--eval-data: .*match no template"),
                                (str(text), 4, "--eval-data: .*ROUGE-L needs 'prompt'")]:
        with pytest.raises(ValueError, match=needle):
            run_sweep(dataclasses.replace(cfg, eval_data=data, rouge_limit=rouge), log=lambda m: None)
    assert not out.exists()


def test_train_args_of_a_wrong_type_are_refused_in_one_line(world, tmp_path):  # noqa: F811
    from click.testing import CliRunner

    from amid.cli import main

    out = tmp_path / "sweep"
    base = ["sweep", "--cache", world["cache"], "--student", world["student"], "--out", str(out), "--preset", "kd"]
    for arg, needle in [("lr=abc", "--train-arg lr takes a number, got 'abc'"),
                        ("max_steps=abc", "--train-arg max_steps takes an integer or null, got 'abc'"),
                        ("max_steps=2.5", "--train-arg max_steps takes an integer or null, got 2.5"),
                        ("adam_betas=0.9", "--train-arg adam_betas takes two numbers"),
                        ("device=tpu:3", "--device tpu:3: not a device")]:
        res = CliRunner().invoke(main, [*base, "--train-arg", arg])
        assert res.exit_code == 1 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output
    # A number JSON does not read (.001) is a number, as amid train --lr .001 takes it.
    res = CliRunner().invoke(main, [*base, "--train-arg", "lr=.001", "--train-arg", "max_steps=abc"])
    assert res.exit_code == 1 and "max_steps takes" in res.stderr and "lr takes" not in res.stderr, res.output
    assert not out.exists()


def test_a_run_killed_by_a_signal_is_reported_by_its_signal(tmp_path, monkeypatch):
    import stat
    import sys

    from amid.sweep import _execute

    # A stand-in for `python -m amid.sweep --run DIR`: prints a progress bar, then dies of a signal.
    child = tmp_path / "child.sh"
    child.write_text('#!/bin/sh\necho "Writing model shards: 100%|####|"\n'
                     'case "$4" in *oom) kill -KILL $$;; *) kill -USR1 $$;; esac\n')
    child.chmod(child.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(child))
    cfg = SweepConfig(cache="c", student="s", out=str(tmp_path / "sweep"))
    pending = [{"name": "oom"}, {"name": "usr1"}]
    for run in pending:
        (tmp_path / "sweep" / "runs" / run["name"]).mkdir(parents=True)
    messages: list[str] = []
    _execute(cfg, pending, messages.append)
    error = {r["name"]: json.loads((tmp_path / "sweep" / "runs" / r["name"] / "result.json").read_text())["error"]
             for r in pending}
    assert error == {"oom": "killed by signal 9 (SIGKILL; out of memory?)", "usr1": "killed by signal 10 (SIGUSR1)"}
    assert any("oom: FAILED (killed by signal 9 (SIGKILL; out of memory?))" in m for m in messages), messages


def test_grid_values_given_twice_are_one_run_and_empty_ones_are_refused(tmp_path):
    from click.testing import CliRunner

    from amid.cli import main

    cfg = SweepConfig(cache="c", student="s", out="o", presets=("kd", "amid", "kd"), alphas=(0.5, 0.5, 1.0))
    assert [r["name"] for r in expand_grid(cfg)] == ["kd", "amid_a0.5_l0.1_kl_pr", "amid_a1_l0.1_kl_pr"]
    with pytest.raises(ValueError, match="run amid_a0.123457_l0.1_kl_pr: two settings under one name"):
        expand_grid(dataclasses.replace(cfg, alphas=(0.1234567, 0.1234568)))
    with pytest.raises(ValueError, match="--alpha: no values"):
        expand_grid(dataclasses.replace(cfg, alphas=()))
    with pytest.raises(ValueError, match="--preset: no values"):
        expand_grid(dataclasses.replace(cfg, presets=()))
    assert [r["name"] for r in expand_grid(dataclasses.replace(cfg, presets=("kd",), alphas=()))] == ["kd"]

    out = tmp_path / "sweep"
    base = ["sweep", "--cache", str(tmp_path / "c"), "--student", "s", "--out", str(out)]
    for args, needle in [(["--alpha", "0.5,,1"], "--alpha '0.5,,1': an empty item"),
                         (["--alpha", ""], "--alpha: no values"),
                         (["--preset", ""], "--preset: no values"),
                         (["--preset", "kd,rkl", "--alpha", ""], "c: "),  # no α needed: on to the cache
                         (["--preset", "kd,"], "--preset 'kd,': an empty item"),
                         (["--devices", "cpu,,cuda:0"], "--devices 'cpu,,cuda:0': an empty item")]:
        res = CliRunner().invoke(main, [*base, *args])
        assert res.exit_code == 1 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output
    res = CliRunner().invoke(main, [*base, "--rouge-limit", "-3"])
    assert res.exit_code == 2 and "--rouge-limit" in res.stderr and "Traceback" not in res.output, res.output
    with pytest.raises(ValueError, match="--rouge-limit must be at least 0"):
        run_sweep(dataclasses.replace(cfg, out=str(out), rouge_limit=-3), log=lambda m: None)
    assert not out.exists()


@pytest.mark.slow
def test_a_rerun_keeps_test_results_and_refuses_runs_of_a_replaced_cache(world, tmp_path):  # noqa: F811
    import shutil

    from amid.teacher import CacheConfig, cache_teacher

    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    out = tmp_path / "sweep"
    test = tmp_path / "test.jsonl"
    shutil.copy(Path(world["root"]) / "data.jsonl", test)
    cfg = SweepConfig(cache=str(cache), student=world["student"], out=str(out), presets=("kd",),
                      train_overrides=TRAIN, eval_data=str(test))
    run_sweep(cfg, log=lambda m: None)
    kept = (out / "runs" / "kd" / "result.json").read_text()
    assert float(_rows(out)["kd"]["test_ppl"]) > 1
    # Extending the grid without --eval-data: the finished run keeps its test results.
    messages: list[str] = []
    run_sweep(dataclasses.replace(cfg, presets=("kd", "skl"), eval_data=None), log=messages.append)
    assert any("1 already finished, 1 to run" in m for m in messages), messages
    assert (out / "runs" / "kd" / "result.json").read_text() == kept
    rows = _rows(out)
    assert float(rows["kd"]["test_ppl"]) > 1 and rows["skl"]["test_ppl"] == "" and rows["skl"]["status"] == "ok"

    # Another cache under the same path: the finished runs are not its runs.
    shutil.rmtree(cache)
    cache_teacher(CacheConfig(teacher=world["teacher"], data=str(Path(world["root"]) / "data.jsonl"), out=str(cache),
                              top_k=8, max_length=64, examples_per_shard=40, device="cpu"),
                  progress=False, log=lambda m: None)
    before = (out / "results.csv").read_text()
    for sweep_json in (True, False):  # runs of this version (sweep_run.json) and of earlier ones (checkpoint)
        if not sweep_json:
            for name in ("kd", "skl"):
                spec = json.loads((out / "runs" / name / "sweep_run.json").read_text())
                del spec["cache_id"]
                (out / "runs" / name / "sweep_run.json").write_text(json.dumps(spec))
        with pytest.raises(ValueError, match=r"runs trained on another cache than the one now at .*cache.*: kd, skl"):
            run_sweep(dataclasses.replace(cfg, presets=("kd", "skl"), eval_data=None), log=lambda m: None)
    assert (out / "results.csv").read_text() == before
    # A finished run whose checkpoint was deleted to save space is known by its sweep_run.json; a
    # run that failed before its first checkpoint trained on no cache, and is simply run.
    shutil.rmtree(out / "runs" / "kd" / "checkpoint")
    spec = json.loads((out / "runs" / "kd" / "sweep_run.json").read_text())
    (out / "runs" / "kd" / "sweep_run.json").write_text(json.dumps({**spec, "cache_id": "the old cache"}))
    with pytest.raises(ValueError, match=r"runs trained on another cache .*: kd, skl"):
        run_sweep(dataclasses.replace(cfg, presets=("kd", "skl"), eval_data=None), log=lambda m: None)
    (out / "runs" / "kd" / "result.json").write_text(json.dumps({"status": "failed", "error": "before step 1"}))
    with pytest.raises(ValueError, match=r"runs trained on another cache .*\): skl; rerun"):
        run_sweep(dataclasses.replace(cfg, presets=("kd", "skl"), eval_data=None), log=lambda m: None)


@pytest.mark.filterwarnings("ignore:No artists with labels")  # the stubs draw nothing
def test_the_plot_puts_infinite_alphas_at_the_ends_and_gives_every_line_its_colour(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from amid.sweep import _plot

    lines: list[tuple[list, str]] = []
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, y, **kw: lines.append((list(x), kw["color"])))
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda self, y, **kw: lines.append(([], kw["color"])))
    row = dict(status="ok", lam=0.1, divergence="kl", order="pr", eval_kl=1.0, eval_ppl=2.0)
    rows = ([{**row, "preset": "amid", "alpha": a} for a in (-math.inf, -1.0, 0.5, math.inf)]
            + [{**row, "preset": "amid", "alpha": 0.5, "lam": 0.5}] + [{**row, "preset": "kd", "alpha": ""}])
    assert _plot(rows, tmp_path / "p.png").stat().st_size > 0
    first = lines[:3]  # one axis: two curves and a dashed preset line
    xs = first[0][0]
    assert xs[1:3] == [-1.0, 0.5] and xs[0] < -1.0 and xs[3] > 0.5 and all(map(math.isfinite, xs))
    assert len({c for _, c in first}) == 3  # the preset's dashed line has a colour no curve has

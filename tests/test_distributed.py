"""Data-parallel `amid train` under torchrun (amid.distributed), on the CPU with Gloo.

W ranks with --grad-accum A must take the steps of one process with A × W: same losses, same
evaluation, same final weights. A run killed between checkpoints resumes on the same number of
ranks with the same losses (each rank's RNG restored); on another number it resumes when the
batches a step (processes x grad-accum) stay the same, and is refused otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from amid.cache import Cache, open_cache
from amid.distributed import Ranks
from amid.loader import Loader, Plan, Position, scan, split
from amid.train import TrainConfig, TrainError, train
from test_train import _losses, config, make_gpt2, make_tokenizer, metrics, quiet, world  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def _torchrun(world: dict, out: Path, *args: str, nproc: int = 2, ok: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "amid.cli", "train", "--cache", world["cache"], "--out", str(out), "--lr", "5e-3",
               "--eval-fraction", "0.2", "--log-every", "1", "--device", "cpu", "--dtype", "fp32",
               "--quiet", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.time()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    summary = out / "summary.json"
    if (ok and done.returncode != 0 and GLOO_TEARDOWN_ABORT in done.stderr and summary.exists()
            and summary.stat().st_mtime >= started):
        # Seen once in ~40 launches (torch 2.13, Gloo): a rank aborts in C++ at interpreter exit,
        # after destroy_process_group, once the run has written everything. The outputs are then
        # complete and the caller's assertions check them in full.
        warnings.warn(f"torchrun: a rank aborted at exit after the run finished ({GLOO_TEARDOWN_ABORT!r})")
        return done
    assert (done.returncode == 0) == ok, done.stderr[-4000:]
    return done


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def _cli(options: dict) -> list[str]:
    """TrainConfig fields as `amid train` options."""
    names = {"warmup_steps": "--warmup"}
    return [x for key, value in options.items()
            for x in (names.get(key, "--" + key.replace("_", "-")), str(value))]


CASES = {
    # One epoch of an odd number of batches: the last step has one batch, so rank 1 has none
    # there and must still take part. The plain-text stream and the CE mix ride along.
    "epoch-end-mid-step": dict(accum=1, batch_size=5, epochs=1, eval_every=3, alpha=0.5, ce_weight=0.2,
                               lm_length=24, lm_batch_size=2, warmup_steps=1, shuffle_buffer=48),
    # Batches by padded tokens, two batches per rank and step, fp16 autocast with its GradScaler.
    "max-tokens-fp16": dict(accum=2, max_tokens=120, max_steps=4, eval_every=2, alpha=-1.0, warmup_steps=0,
                            shuffle_buffer=32, dtype="fp16"),
    # fp16 with one batch in all: rank 1 has none in its first step and must still unscale (its
    # GradScaler's scale is set before the first step, not by its first scale()).
    "fp16-first-step-without-batch": dict(accum=1, batch_size=100, epochs=1, eval_every=1000, warmup_steps=0,
                                          shuffle_buffer=100, dtype="fp16"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_take_the_steps_of_one_process_with_twice_the_accumulation(world, tmp_path, case):
    options = dict(CASES[case])
    accum = options.pop("accum")
    if "lm_length" in options:
        options["lm_data"] = str(world["root"] / "data.jsonl")
    if "epochs" in options:
        metas = scan(open_cache(world["cache"]))
        plan = Plan(metas, split(metas, 0.2, 1000)[0], 0, options["batch_size"], None, options["shuffle_buffer"],
                    1 << 21)
        assert plan.batches_per_epoch % 2 == 1  # the case this test is about

    torch.set_num_threads(1)  # as the ranks run (torchrun: OMP_NUM_THREADS=1)
    try:
        one = train(config(world, tmp_path / "one", grad_accum=2 * accum, preset="amid",
                           **{"max_steps": None, **options}), log=quiet)
    finally:
        torch.set_num_threads(2)
    _torchrun(world, tmp_path / "two", "--student", world["student"], "--preset", "amid", "--grad-accum", str(accum),
              *_cli(options))

    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    if "epochs" in options:
        assert one["total_steps"] == (plan.batches_per_epoch + 1) // 2
    assert [m["step"] for m in a] == [m["step"] for m in b]
    # With several batches per rank the gradients are added in another order: float32 ulps, which
    # fp16 logits (and Adam's sign-like steps on near-zero gradients) amplify step by step: after 4
    # fp16 steps measured up to 1.2e-5 relative in the metrics and 1.4e-6 absolute in the weights
    # (lr 5e-3: under a thousandth of one Adam step; a lost or repeated batch changes the steps).
    fp16 = options.get("dtype") == "fp16"
    rel, atol = (1e-4, 1e-5) if fp16 else (1e-5, 1e-6)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x.keys() - {"tokens_per_s"}:
            assert x[key] == pytest.approx(y[key], rel=rel, abs=1e-6), (x["step"], key)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["train_tokens"] == one["train_tokens"]
    wa, wb = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=rel, atol=atol, msg=name)
    json.loads((tmp_path / "two" / "config.json").read_text())  # written once, whole, by rank 0


@pytest.mark.slow
def test_two_rank_run_resumes_on_two_ranks_and_refuses_one(world, tmp_path):
    # A GPT-2 student with dropout (each rank's RNG state matters) and a padded vocabulary; the
    # first run stops at step 3 (its checkpoint), the second continues it to step 6. A constant
    # schedule makes the learning rate independent of max_steps, so the two must equal one run.
    student = tmp_path / "gpt2"
    make_tokenizer(student)
    make_gpt2(student, world["vocab"] + 5, seed=3, dropout=0.1)
    common = ("--student", str(student), "--batch-size", "4", "--grad-accum", "2", "--schedule", "constant",
              "--warmup", "0", "--save-every", "3", "--eval-every", "1000", "--shuffle-buffer", "32", "--preset", "amid", "--alpha", "0")
    _torchrun(world, tmp_path / "whole", *common, "--max-steps", "6")
    _torchrun(world, tmp_path / "split", *common, "--max-steps", "3")
    assert sorted(_losses(tmp_path / "split")) == [1, 2, 3]

    saved = TrainConfig.from_dict(json.loads((tmp_path / "split" / "config.json").read_text()))
    with pytest.raises(TrainError, match="trained by 2 process.*4 batches a step; this is 1 x 2; resume "
                                         "--grad-accum 4 on 1 process"):
        train(TrainConfig(**{**saved.to_dict(), "resume": True, "max_steps": 6}), log=quiet)

    _torchrun(world, tmp_path / "split", *common, "--max-steps", "6", "--resume")
    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6, rel=0), step

    # Every rank refuses a second run into the same directory; the message is printed once.
    refused = _torchrun(world, tmp_path / "whole", *common, "--max-steps", "6", ok=False)
    assert refused.stderr.count("already holds a run; pass --resume") == 1, refused.stderr[-4000:]


def test_a_two_rank_run_resumes_in_one_process_with_twice_the_grad_accum(world, tmp_path):
    # The same batches a step (processes x grad-accum): a run rescheduled on fewer GPUs goes on.
    # A student without dropout: the steps equal one uninterrupted process with grad-accum 4.
    common = ("--student", world["student"], "--batch-size", "4", "--schedule", "constant", "--warmup", "0",
              "--eval-every", "1000", "--shuffle-buffer", "32")
    _torchrun(world, tmp_path / "split", *common, "--grad-accum", "2", "--save-every", "3", "--max-steps", "3")
    whole = config(world, tmp_path / "whole", batch_size=4, grad_accum=4, schedule="constant", max_steps=6,
                   lr=5e-3, shuffle_buffer=32)
    train(whole, log=quiet)
    logs: list[str] = []
    saved = TrainConfig.from_dict(json.loads((tmp_path / "split" / "config.json").read_text()))
    train(TrainConfig(**{**saved.to_dict(), "resume": True, "max_steps": 6, "grad_accum": 4}), log=logs.append)
    assert any("note: resuming a run of 2 process(es) x --grad-accum 2 on 1 x 4" in m for m in logs), logs
    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), step


def test_ranks_that_see_different_checkpoints_are_refused(world, tmp_path):
    # Without a shared file system rank 0 could resume at step 3 while another starts afresh:
    # their collectives would no longer pair up. The views are compared first.
    import amid.train as amid_train

    class SplitView(Ranks):
        def barrier(self) -> None:
            pass

        def gather(self, obj):
            return [obj, (3, Position().to_dict())]

    with pytest.raises(TrainError, match=r"see different checkpoints \(steps none, 3\).*shared file system"):
        amid_train._train(config(world, tmp_path / "run"), torch.device("cpu"), SplitView(rank=0, world=2), quiet)
    assert not (tmp_path / "run").exists()


def test_ranks_that_read_different_caches_are_refused(world, tmp_path):
    # On several nodes each reads its own --cache: same path, other shards, other data.
    import amid.train as amid_train

    class OtherCache(Ranks):
        def barrier(self) -> None:
            pass

        def gather(self, obj):
            return [obj, "another cache" if isinstance(obj, str) else obj]

    with pytest.raises(TrainError, match="read different caches under this path"):
        amid_train._train(config(world, tmp_path / "run"), torch.device("cpu"), OtherCache(rank=0, world=2), quiet)
    assert not (tmp_path / "run").exists()


def _served_batches(plan: Plan, start: Position, epochs: int) -> list:
    """The plan's batches from `start` to the end of `epochs`, in serving order."""
    out = []
    for e in range(start.epoch, epochs):
        for w, (_, batches) in enumerate(plan.epoch(e)):
            if (e, w) >= (start.epoch, start.window):
                out.extend(batches[start.batch if (e, w) == (start.epoch, start.window) else 0:])
    return out


def test_ranks_serve_the_one_stream_between_them(world):
    # Every rank walks the whole stream (same positions), decodes and collates only batch
    # i mod W = rank, and together they serve exactly the single-process stream, from the start or
    # mid-stream.
    cache = open_cache(world["cache"])
    metas = scan(cache)
    plan = Plan(metas, split(metas, 0.2, 1000)[0], seed=4, batch_size=6, max_tokens=None, shuffle_buffer=20)
    with Loader(cache, plan, pad_id=1, epochs=2) as loader:
        single = list(loader)
    for start in (0, 5):
        streams, decoded = [], []
        for rank in range(3):
            seen: list[tuple[int, int]] = []
            cache.iter_shard = lambda s, compact=False, rows=None, seen=seen: (
                seen.extend((s, int(r)) for r in rows) or Cache.iter_shard(cache, s, compact, rows))
            with Loader(cache, plan, pad_id=1, start=single[start - 1][1] if start else Position(), epochs=2,
                        rank=rank, world=3) as loader:
                streams.append(list(loader))
            decoded.append(seen)
        del cache.iter_shard
        expected = single[start:]
        for rank, stream in enumerate(streams):
            assert [p for _, p in stream] == [p for _, p in expected]
            for i, (batch, _) in enumerate(stream):
                assert (batch is not None) == (i % 3 == rank)
                if batch is not None:
                    assert torch.equal(batch["input_ids"], expected[i][0]["input_ids"])
                    assert torch.equal(batch["topk_ids"], expected[i][0]["topk_ids"])
            # A rank decodes the examples of its own batches, each once an epoch, and nothing else.
            own = [(int(s), int(r)) for b in _served_batches(plan, single[start - 1][1] if start else Position(), 2)[rank::3]
                   for s, r in b]
            assert sorted(decoded[rank]) == sorted(own)


def _sum_grads_worker(rank: int, store: str) -> None:
    import torch.distributed as dist

    import amid.distributed as amid_dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        amid_dist._BUCKET_BYTES = 40  # several buckets, and a dtype change inside one
        torch.manual_seed(0)
        params = [torch.zeros(3, 4), torch.zeros(5), torch.zeros(2, dtype=torch.float64), torch.zeros(7)]
        grads = [[torch.randn(p.shape, dtype=p.dtype) for p in params] for _ in range(2)]  # same on both ranks
        params[0].grad = grads[rank][0].clone()  # both ranks
        if rank == 0:
            params[1].grad = grads[0][1].clone()  # rank 0 only: rank 1 adds zeros
        params[2].grad = grads[rank][2].clone()
        # params[3]: no rank has a gradient; it must stay None (the optimizer skips it)
        Ranks(rank=rank, world=2).sum_grads(params)
        torch.testing.assert_close(params[0].grad, grads[0][0] + grads[1][0], rtol=0, atol=0)
        torch.testing.assert_close(params[1].grad, grads[0][1], rtol=0, atol=0)
        torch.testing.assert_close(params[2].grad, grads[0][2] + grads[1][2], rtol=0, atol=0)
        assert params[2].grad.dtype == torch.float64
        assert params[3].grad is None
        assert Ranks(rank=rank, world=2).sum_numbers([rank + 1, 10], torch.int64) == [3, 20]
    finally:
        dist.destroy_process_group()


def test_gradients_are_summed_across_ranks_and_untouched_ones_stay_none(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sum_grads_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)


def test_device_under_torchrun(monkeypatch):
    import amid.train as amid_train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(amid_train, "resolve_device", lambda d: torch.device("cuda:0" if d == "auto" else d))
    cfg = TrainConfig(cache="c", student="s", out="o")
    assert amid_train._train_device(cfg) == torch.device("cuda", 1)  # "auto" and "cuda" take LOCAL_RANK's GPU
    assert amid_train._train_device(TrainConfig(cache="c", student="s", out="o", device="cuda")) == torch.device("cuda", 1)
    assert amid_train._train_device(TrainConfig(cache="c", student="s", out="o", device="cpu")) == torch.device("cpu")
    with pytest.raises(TrainError, match="--device cuda:0 names one GPU"):
        amid_train._train_device(TrainConfig(cache="c", student="s", out="o", device="cuda:0"))


def test_devices_this_machine_lacks_are_refused_in_one_line(monkeypatch):
    from amid.teacher import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: .* no CUDA device; use --device cpu or auto"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="--device gpu: not a device"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="has 2 CUDA device\\(s\\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cpu") == torch.device("cpu")


def test_cli_errors_under_torchrun_name_the_rank_that_is_alone_in_meeting_them(monkeypatch):
    import click

    import amid.cli as cli
    from amid.cache import CacheError

    def failing(own: bool):
        @cli.friendly_errors
        def command():
            exc = CacheError("shard 3: bad")
            if own:
                exc.this_rank_only = True
            raise exc
        return command

    slept = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(click.ClickException, match="^shard 3: bad$"):
        failing(own=False)()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(click.ClickException, match="^rank 1: shard 3: bad$"):  # one rank's own: said at once
        failing(own=True)()
    assert slept == []
    with pytest.raises(click.ClickException, match="^rank 1: shard 3: bad$"):  # rank 0 says it first
        failing(own=False)()
    assert slept == [cli.RANK_ERROR_GRACE_S]


def test_amid_eval_under_torchrun_is_refused(monkeypatch, tmp_path):
    from amid.evaluate import EvalConfig, evaluate

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one process; run it without torchrun"):
        evaluate(EvalConfig(model=str(tmp_path), data=str(tmp_path / "d.jsonl"), out=str(tmp_path / "e")))
    assert not (tmp_path / "e").exists()


def test_several_ranks_without_torch_distributed_are_refused_in_one_line(monkeypatch):
    import amid.distributed as amid_dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(amid_dist.dist, "is_available", lambda: False)
    with pytest.raises(ValueError, match="WORLD_SIZE=2 .* no torch.distributed"):
        amid_dist.start_ranks(torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert amid_dist.start_ranks(torch.device("cpu")) == amid_dist.Ranks()


def _worker_pid(parent: int, rank: int) -> int | None:
    """PID of torchrun's (`parent`) worker of that RANK, from /proc; None if not (yet) found."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and f"RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0"):
                return int(d.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


@pytest.mark.slow
@pytest.mark.parametrize("to", ["every process", "rank 1 only"])
def test_ctrl_c_under_torchrun_stops_every_rank_after_one_step_with_a_checkpoint(world, tmp_path, to):
    # As a terminal delivers Ctrl-C: to torchrun and both ranks (one process group); torchrun
    # passes it on to the ranks again. Both stop after the same step; rank 0 saves and says so.
    # A signal that reaches one rank only (a scheduler's kill of one worker) stops them all the
    # same, and rank 0 names that signal.
    import signal

    if to == "rank 1 only" and not Path("/proc/self/environ").exists():
        pytest.skip("finds rank 1's process through /proc (Linux)")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "amid.cli", "train", "--cache", world["cache"], "--student", world["student"], "--out", str(out),
               "--lr", "1e-3", "--eval-fraction", "0.2", "--log-every", "1", "--device", "cpu", "--dtype", "fp32",
               "--max-steps", "100000", "--save-every", "100000", "--eval-every", "100000", "--quiet"]
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        if (out / "metrics.jsonl").exists() and any("loss" in m for m in metrics(out)):
            break
        time.sleep(0.05)
    if to == "every process":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(_worker_pid(proc.pid, 1), signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert "Stopped: SIGINT at step " in err, err[-4000:]
    assert "Traceback" not in err.split("Stopped: SIGINT at step ")[0], err[-4000:]
    step = int(err.split("Stopped: SIGINT at step ")[1].split()[0])
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == step and state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert max(_losses(out)) == step

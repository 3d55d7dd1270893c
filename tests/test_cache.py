"""Stage one end to end: `cache_teacher` / `amid cache-teacher` against tiny real architectures.

What is shown here (issue 3, "What must be shown"):
- the cached top-k ids, log-probs and tail mass equal the teacher's full distribution recomputed
  independently (plain forward of each example alone, float64 log-softmax), for GPT-2, Llama and
  Qwen2 (padded output vocabulary), on instruction data and on plain text;
- a run killed with SIGKILL at random points and resumed ends with the same cache as an
  uninterrupted run (slow; a fast in-process crash simulation runs always);
- damaged shards are refused, naming the file; refusals leave no output behind;
- the shards load with pyarrow.dataset and datasets, without amid.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amid.cache import CacheError, ShardWriter, open_cache
from amid.cli import main as cli
from amid.codec import round_logprobs
from amid.data import DataError
from amid.teacher import CacheConfig, cache_teacher, teacher_topk
from helpers import instruction_records, save_teacher, text_records, write_jsonl

K = 64
LP_REL = 2.0**-9  # 8 significant mantissa bits, round to nearest: half an ulp, relative
TIE_TOL = 1e-4  # log-prob difference under which two tokens are a tie (float32 forward noise ≈ 1e-6)
REPO = Path(__file__).resolve().parents[1]


def _quiet(*_a, **_k):
    pass


def run_cache(**kw) -> dict:
    return cache_teacher(CacheConfig(**kw), progress=False, log=_quiet)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Tiny teachers saved to disk: GPT-2 and Llama (BOS-prepending tokenizer) with vocab = tokenizer,
    Qwen2 with a padded output vocabulary (320 logits for a 300-token tokenizer)."""
    root = tmp_path_factory.mktemp("teachers")
    return {
        "gpt2": save_teacher(root / "gpt2", "gpt2", tokenizer_vocab=300),
        "llama": save_teacher(root / "llama", "llama", tokenizer_vocab=300),
        "qwen2": save_teacher(root / "qwen2", "qwen2", tokenizer_vocab=300, model_vocab=320),
    }


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "instruction": write_jsonl(root / "inst.jsonl", instruction_records(14, seed=1)),
        "text": write_jsonl(root / "text.jsonl", text_records(12, seed=2)),
    }


@pytest.fixture(scope="module")
def gpt2_cache(teachers, data_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "cache"
    run_cache(teacher=str(teachers["gpt2"]), data=str(data_files["instruction"]), out=str(out),
              examples_per_shard=4, batch_size=3)
    return out


# ----------------------------------------------------------------------------------------------
# Independent reference


def expected_example(tokenizer, record: dict, kind: str) -> tuple[list[int], list[int]]:
    """input_ids and target positions written out from the definitions, not via amid.data."""
    bos = [tokenizer.bos_token_id] if tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id else []
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if kind == "text":
        ids = bos + enc(record["text"]) + [tokenizer.eos_token_id]
        first = len(bos)
    else:
        prompt = enc(record["prompt"])
        ids = bos + prompt + enc(record["response"]) + [tokenizer.eos_token_id]
        first = len(bos) + len(prompt)  # first response token
    # logits row t predicts input_ids[t + 1]: rows first-1 .. T-2 (row 0 at least)
    return ids, list(range(max(first - 1, 0), len(ids) - 1))


def assert_matches_reference(ex: dict, ref: torch.Tensor, k: int) -> None:
    """ex: a cached example's rows; ref: [P, V] float64 log-softmax of the teacher's logits."""
    ids = ex["topk_ids"]
    lps = ex["topk_logprobs"].double()
    tail = ex["tail_logmass"].double()
    assert ids.shape == lps.shape == (ref.shape[0], k) and tail.shape == (ref.shape[0],)
    assert bool((ids[:, 1:] > ids[:, :-1]).all()), "ids are stored sorted ascending and distinct"
    ref_at = ref.gather(1, ids)
    kth = ref.topk(k, dim=-1).values[:, -1:]
    # Ids exact up to ties: every cached id is in the top k (up to a tie at the k-th value) and
    # every id clearly above the k-th value is cached.
    assert bool((ref_at >= kth - TIE_TOL).all()), "a cached id is not among the teacher's top k"
    assert torch.equal((ref > kth + TIE_TOL).sum(-1), (ref_at > kth + TIE_TOL).sum(-1)), "a top-k id is missing"
    # Log-probs within the stored precision (relative half-ulp at 8 mantissa bits), plus float32 forward noise.
    err = (lps - ref_at).abs()
    bound = LP_REL * ref_at.abs() + 1e-5
    assert bool((err <= bound).all()), f"log-prob error {float((err / bound).max()):.3g}× the bound"
    # And the stored values really are 8-bit-mantissa float16 values (nothing finer was kept).
    stored = ex["topk_logprobs"].numpy()
    assert np.array_equal(round_logprobs(stored).astype(np.float32), stored)
    # Tail mass exact (float32 logsumexp over the complement of the cached ids) to 1e-5 relative.
    in_s = torch.zeros_like(ref, dtype=torch.bool).scatter_(1, ids, True)
    ref_tail = torch.logsumexp(ref.masked_fill(in_s, -math.inf), dim=-1)
    rel = torch.expm1(tail - ref_tail).abs()
    assert float(rel.max()) <= 1e-5, f"tail mass relative error {float(rel.max()):.3g}"


@pytest.mark.parametrize("kind", ["instruction", "text"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_cache_matches_teacher_full_logits(arch, kind, teachers, data_files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = teachers[arch]
    temperature = 2.0 if (arch, kind) == ("gpt2", "text") else 1.0
    out = tmp_path / "cache"
    run_cache(teacher=str(teacher), data=str(data_files[kind]), out=str(out),
              examples_per_shard=5, batch_size=4, temperature=temperature)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    records = [json.loads(line) for line in open(data_files[kind])]

    cache = open_cache(out)
    assert cache.manifest["k"] == K and cache.manifest["vocab_size"] == vocab
    assert cache.manifest["data"]["template"] == ("text" if kind == "text" else "plain")
    assert cache.manifest["tokenizer"]["vocab_size"] == len(tokenizer) == 300
    examples = list(cache)
    assert [e["example_id"] for e in examples] == list(range(len(records)))
    assert len(cache.shards) == math.ceil(len(records) / 5)
    total = 0
    for ex, record in zip(examples, records):
        ids, positions = expected_example(tokenizer, record, kind)
        assert ex["input_ids"].tolist() == ids
        assert ex["positions"].tolist() == positions
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        ref = torch.log_softmax(logits / temperature, dim=-1)[positions]
        assert ref.shape[1] == vocab
        assert_matches_reference(ex, ref, K)
        total += len(positions)
    counts = cache.manifest["counts"]
    assert counts["examples"] == len(records) and counts["positions"] == total
    assert cache.check() == {"shards": len(cache.shards), "examples": len(records), "positions": total}


def test_padded_vocab_ids_use_uint16_and_tail_exact_with_k_near_vocab(teachers, data_files, tmp_path):
    """k = V − 1 leaves one token in the tail: its mass is that token's probability exactly."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cache"
    run_cache(teacher=str(teachers["qwen2"]), data=str(data_files["text"]), out=str(out), top_k=319, limit=3)
    model = AutoModelForCausalLM.from_pretrained(teachers["qwen2"], dtype=torch.float32).eval()
    cache = open_cache(out)
    import pyarrow.parquet as pq

    assert str(pq.read_schema(cache.shard_path(0, "topk")).field("topk_id").type) == "uint16"
    logs: list[str] = []  # a k beyond the vocabulary is every token, and says so
    whole = cache_teacher(CacheConfig(teacher=str(teachers["qwen2"]), data=str(data_files["text"]),
                                      out=str(tmp_path / "all"), top_k=5000, limit=1), progress=False, log=logs.append)
    assert whole["k"] == 320 and "note: --top-k 5000 is more than the teacher's 320 output logits" in "\n".join(logs)
    for ex in cache:
        with torch.no_grad():
            ref = torch.log_softmax(model(ex["input_ids"][None]).logits[0].double(), -1)[ex["positions"]]
        assert_matches_reference(ex, ref, 319)


def _head_input_logits(model, input_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 logits from the exact input of the model's LM head, the model's own logits as float64).

    The hook sees what the model itself feeds its head, independently of amid's own route."""
    seen = {}
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda mod, args, out: seen.update(h=args[0]))  # returns None: output kept
    try:
        with torch.no_grad():
            own = model(torch.tensor([input_ids])).logits[0].double()
    finally:
        handle.remove()
    with torch.no_grad():
        z = seen["h"][0].double() @ head.weight.double().T + (0 if head.bias is None else head.bias.double())
    return z, own


def test_bf16_teacher_log_probs_come_from_a_float32_head(teachers, data_files, tmp_path):
    """A bf16 teacher's body runs in bf16, but its LM head runs in float32: the stored log-probs
    are those of the float32 logits, not of logits rounded to bf16's 8 significant bits."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cache"
    manifest = run_cache(teacher=str(teachers["llama"]), data=str(data_files["instruction"]), out=str(out),
                         dtype="bf16", batch_size=1, limit=6)
    assert manifest["teacher_dtype"] == "bfloat16" and manifest["teacher_logits"] == "float32 head"
    model = AutoModelForCausalLM.from_pretrained(teachers["llama"], dtype=torch.bfloat16).eval()
    bf16_logits_would_fail = False
    for ex in open_cache(out):
        z, own = _head_input_logits(model, ex["input_ids"].tolist())
        ref = torch.log_softmax(z, -1)[ex["positions"]]
        assert_matches_reference(ex, ref, K)
        # The model's own bf16 logits are measurably worse than the stored precision.
        own_lp = torch.log_softmax(own, -1)[ex["positions"]].gather(1, ex["topk_ids"])
        bf16_logits_would_fail |= bool(((own_lp - ref.gather(1, ex["topk_ids"])).abs()
                                        > LP_REL * own_lp.abs() + 1e-5).any())
    assert bf16_logits_would_fail, "the bf16 logits were as exact as the stored values: the test shows nothing"

    # The trainer's online reference runs the teacher the same way (bf16 body, float32 head).
    from amid.cache import open_cache as _open
    from amid.train import TrainConfig, _load_teacher

    cfg = TrainConfig(cache=str(out), student=str(teachers["llama"]), out=str(tmp_path / "run"),
                      online_teacher=str(teachers["llama"]))
    online = _load_teacher(cfg.online_teacher, cfg, _open(out), torch.device("cpu"), print, "--online-teacher")
    assert online.target.route.model.dtype == torch.bfloat16 and online.target.mode == "float32 head"
    ex = next(iter(open_cache(out)))
    batch = {"input_ids": ex["input_ids"][None], "attention_mask": torch.ones(1, len(ex["input_ids"]), dtype=torch.long),
             "rows": ex["positions"]}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as inside the training step
        z = online.logits(batch, model.get_output_embeddings().weight.shape[0])
    z_ref, _ = _head_input_logits(model, ex["input_ids"].tolist())
    assert torch.allclose(z.double(), z_ref[ex["positions"]], rtol=1e-6, atol=1e-5)


def test_resume_with_another_teacher_dtype_is_refused(teachers, data_files, tmp_path):
    out = tmp_path / "cache"
    kw = dict(teacher=str(teachers["gpt2"]), data=str(data_files["instruction"]), out=str(out), limit=4,
              examples_per_shard=2)
    import amid.teacher as teacher_mod

    real = teacher_mod.ShardWriter.close
    calls = {"n": 0}

    def close_then_die(self):
        calls["n"] += 1
        rec = real(self)
        if calls["n"] == 1:
            raise KeyboardInterrupt("killed after the first shard")
        return rec

    teacher_mod.ShardWriter.close = close_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            run_cache(**kw)
    finally:
        teacher_mod.ShardWriter.close = real
    with pytest.raises(CacheError, match="bfloat16.*--dtype"):
        run_cache(dtype="bf16", **kw)
    assert run_cache(dtype="fp32", **kw)["counts"]["examples"] == 4  # the same settings resume


def test_a_teacher_without_an_lm_head_is_refused_in_one_line(teachers, data_files, tmp_path, monkeypatch):
    # A remote-code model whose get_output_embeddings() is None (no logits to cache).
    import amid.teacher

    real = amid.teacher.load_model

    def headless(*args, **kwargs):
        model = real(*args, **kwargs)
        model.get_output_embeddings = lambda: None
        return model

    monkeypatch.setattr(amid.teacher, "load_model", headless)
    with pytest.raises(DataError, match="the model has no LM head .*needs a causal LM"):
        run_cache(teacher=str(teachers["gpt2"]), data=str(data_files["instruction"]), out=str(tmp_path / "c"), limit=4)
    assert not (tmp_path / "c").exists()


def test_teacher_with_nan_logits_is_refused_and_writes_no_shard(data_files, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = save_teacher(tmp_path / "teacher", "gpt2", tokenizer_vocab=300)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = math.nan  # every hidden state, hence every logit, NaN
    model.save_pretrained(teacher)
    out = tmp_path / "cache"
    data = str(data_files["instruction"])
    with pytest.raises(CacheError, match=rf"^{re.escape(data)}:\d+: .*NaN at \d+ target position.*first in this record; .*--dtype"):
        run_cache(teacher=str(teacher), data=data, out=str(out), limit=4)
    assert not list(out.rglob("*.parquet"))


def test_teacher_that_transforms_its_head_output_keeps_its_own_logits(data_files, tmp_path):
    """Gemma 2 soft-caps its logits after the LM head: the plain-head probe at load time sees it
    (the cap is set low so a random tiny model's logits reach it) and the cache holds the model's
    own (capped) distribution."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    from helpers import train_tokenizer

    tok = train_tokenizer(300, add_bos=True)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                       final_logit_softcapping=5.0, initializer_range=0.5, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    teacher = tmp_path / "gemma2"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    out = tmp_path / "cache"
    manifest = run_cache(teacher=str(teacher), data=str(data_files["text"]), out=str(out), limit=4, batch_size=2)
    assert manifest["teacher_logits"] == "model"
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    for ex in open_cache(out):
        z, own = _head_input_logits(model, ex["input_ids"].tolist())
        assert float((own - z).abs().max()) > 1.0, "the soft-cap should move the logits"
        assert_matches_reference(ex, torch.log_softmax(own, -1)[ex["positions"]], K)


def test_shards_are_bounded_by_examples_and_by_positions(teachers, data_files, tmp_path):
    from amid.data import Example
    from amid.teacher import shard_tasks

    examples = [Example(example_id=i, input_ids=list(range(n + 1)), positions=list(range(n)))
                for i, n in enumerate([3, 4, 10, 2, 2, 2, 1, 5])]
    tasks = shard_tasks(examples, max_examples=3, max_positions=6)
    assert [[e.example_id for e in t] for t in tasks] == [[0], [1], [2], [3, 4, 5], [6, 7]]
    assert [e for t in tasks for e in t] == examples  # every example once, in order
    assert shard_tasks(examples, 100, 10**9) == [examples]

    out = tmp_path / "cache"
    manifest = run_cache(teacher=str(teachers["gpt2"]), data=str(data_files["text"]), out=str(out),
                         positions_per_shard=40)
    cache = open_cache(out)
    assert manifest["data"]["positions_per_shard"] == 40 and len(cache.shards) > 1
    assert all(s["positions"] <= 40 or s["examples"] == 1 for s in cache.shards)
    assert sum(s["examples"] for s in cache.shards) == manifest["counts"]["examples"]


# ----------------------------------------------------------------------------------------------
# Resume


def _read_all(path: Path) -> list[dict]:
    return list(open_cache(path))


def assert_same_cache(a: Path, b: Path) -> None:
    ea, eb = _read_all(a), _read_all(b)
    assert len(ea) == len(eb)
    for x, y in zip(ea, eb):
        assert x.keys() == y.keys()
        for key in x:
            if key == "example_id":
                assert x[key] == y[key]
            else:
                assert torch.equal(x[key], y[key]), (x["example_id"], key)
    ma, mb = open_cache(a).manifest, open_cache(b).manifest
    assert ma["counts"] == mb["counts"]
    assert ma["shards"] == mb["shards"]  # same files, sizes and checksums
    assert ma["fingerprint"] == mb["fingerprint"]


def _visible_shards(out: Path) -> list[str]:
    """Shard files visible to readers, as part/name."""
    return sorted(f"{d.name}/{p.name}" for d in (out / "examples", out / "topk") if d.exists()
                  for p in d.iterdir() if not p.name.startswith("."))


def _temporaries(out: Path) -> list[Path]:
    return [p for d in ("examples", "topk") for p in (out / d).glob(".*")]


def test_resume_after_simulated_crash_in_process(teachers, data_files, tmp_path, monkeypatch):
    """Fast stand-in for the SIGKILL test: die after a shard's rename but before its progress
    record, and in the middle of writing a shard (a temporary file left behind)."""
    import amid.teacher as teacher_mod

    kw = dict(teacher=str(teachers["gpt2"]), data=str(data_files["instruction"]), examples_per_shard=2, batch_size=2)
    ref = tmp_path / "ref"
    run_cache(out=str(ref), **kw)
    out = tmp_path / "out"

    class Killed(BaseException):
        pass

    real_close = ShardWriter.close

    def crashing_writer(after: int, mode: str):
        calls = {"n": 0}

        class W(ShardWriter):
            def close(self):
                calls["n"] += 1
                if calls["n"] < after:
                    return real_close(self)
                if mode == "after_rename":
                    real_close(self)  # the shard is visible, its progress record is not written
                elif mode == "between_files":  # one file of the pair renamed, the other not
                    real_close(self)
                    (self.directory / "examples" / f"shard-{self.task:06d}.parquet").unlink()
                else:  # mid-write: a temporary file with partial content, no rename
                    tmp = self.directory / "topk" / f".shard-{self.task:06d}.parquet.tmp-{_dead_pid()}"
                    tmp.parent.mkdir(parents=True, exist_ok=True)
                    tmp.write_bytes(b"PAR1 partial")
                raise Killed()

        return W

    for after, mode in [(2, "after_rename"), (3, "between_files"), (3, "after_rename"), (2, "mid_write")]:
        monkeypatch.setattr(teacher_mod, "ShardWriter", crashing_writer(after, mode))
        with pytest.raises(Killed):
            run_cache(out=str(out), **kw)
        assert not (out / "manifest.json").exists()
        with pytest.raises(CacheError, match="incomplete"):
            open_cache(out)
    assert _temporaries(out), "the simulated mid-write left a temporary file"
    monkeypatch.setattr(teacher_mod, "ShardWriter", ShardWriter)
    run_cache(out=str(out), **kw)
    assert not _temporaries(out), "stale temporary shards are cleaned on resume"
    assert_same_cache(out, ref)
    # Rerunning a complete cache is a no-op.
    before = (out / "manifest.json").read_bytes()
    run_cache(out=str(out), **kw)
    assert (out / "manifest.json").read_bytes() == before


def _dead_pid() -> int:
    """The PID of a process that has ended (a killed writer's, as its temporaries name it)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _cli_cache_cmd(teacher: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "amid.cli", "cache-teacher", "--teacher", str(teacher), "--data", str(data),
            "--out", str(out), "--examples-per-shard", "2", "--batch-size", "1", "--quiet"]


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(teachers, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", instruction_records(200, seed=7))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    ref = tmp_path / "ref"
    subprocess.run(_cli_cache_cmd(teachers["gpt2"], data, ref), check=True, env=env, capture_output=True)
    n_shards = len(open_cache(ref).shards)
    assert n_shards == 100

    out = tmp_path / "out"
    cmd = _cli_cache_cmd(teachers["gpt2"], data, out)
    rng = random.Random(20260101)
    killed_mid_run = 0
    # Kill points: as soon as a random number of new shards is visible (typically between a
    # shard's rename and its progress record), or at a random moment shortly after the first new
    # shard (anywhere: forward pass, shard or progress write).
    plans = [("shards", rng.randint(2, 15)), ("time", rng.uniform(0.0, 0.05)), ("shards", rng.randint(5, 25)),
             ("time", rng.uniform(0.0, 0.05))]
    for i, (how, amount) in enumerate(plans):
        start = len(_visible_shards(out))
        log = open(tmp_path / f"run{i}.log", "w+")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            n = len(_visible_shards(out))
            if how == "shards" and n >= start + amount:
                break
            if how == "time" and n > start:
                time.sleep(amount)
                break
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.seek(0)
        if proc.returncode == -signal.SIGKILL and not (out / "manifest.json").exists():
            killed_mid_run += 1
            with pytest.raises(CacheError, match="incomplete"):
                open_cache(out)
        else:
            assert proc.returncode in (0, -signal.SIGKILL), log.read()[-2000:]
        log.close()
    assert killed_mid_run >= 3, "the kills should land while the run is in progress"
    # A stale temporary shard from a killed writer must not survive or be read.
    stale = out / "examples" / f".shard-000003.parquet.tmp-{_dead_pid()}"
    stale.write_bytes(b"garbage")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not stale.exists()
    assert _visible_shards(out) == _visible_shards(ref)
    assert_same_cache(out, ref)


@pytest.mark.slow
def test_sigterm_stops_cache_teacher_in_one_line_and_the_rerun_finishes(teachers, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", instruction_records(200, seed=8))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "out"
    cmd = _cli_cache_cmd(teachers["gpt2"], data, out)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while proc.poll() is None and not _visible_shards(out) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == ("Stopped: SIGTERM; the finished shards are kept: rerun the same "
                                            "command to continue"), err[-2000:]
    assert "Traceback" not in err
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    open_cache(out)


# ----------------------------------------------------------------------------------------------
# Damaged shards


@pytest.mark.parametrize("damage,part", [("truncate", "topk"), ("flip", "topk"), ("flip", "examples")])
def test_damaged_shard_is_refused_naming_it(gpt2_cache, tmp_path, damage, part):
    import shutil

    out = tmp_path / "cache"
    shutil.copytree(gpt2_cache, out)
    victim = out / part / "shard-000001.parquet"
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))

    cache = open_cache(out)  # opening reads only the manifest
    with pytest.raises(CacheError) as err:
        list(cache)
    msg = str(err.value)
    assert f"{part}/shard-000001.parquet" in msg and "\n" not in msg
    with pytest.raises(CacheError, match=f"{part}/shard-000001.parquet"):
        cache.check()

    if damage == "flip" and part == "topk":  # the real command line once (exit status, stderr, a clean exit)
        res = subprocess.run([sys.executable, "-m", "amid.cli", "cache-info", str(out), "--verify"],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert res.returncode == 1, (res.returncode, res.stderr)
        stdout, stderr = res.stdout, res.stderr
    else:
        res = CliRunner().invoke(cli, ["cache-info", str(out), "--verify"])
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
        stdout, stderr = res.stdout, res.stderr
    assert "Traceback" not in stdout + stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: shard ") and f"{part}/shard-000001.parquet" in lines[0], stderr
    # Without --verify the damaged shard is not read: cache-info still describes the cache.
    assert CliRunner().invoke(cli, ["cache-info", str(out)]).exit_code == 0


def test_compact_decoding_holds_the_same_values_in_half_the_memory(gpt2_cache):
    cache = open_cache(gpt2_cache)
    for full, compact in zip(cache.iter_shard(1), cache.iter_shard(1, compact=True)):
        assert compact["topk_ids"].dtype == torch.int32 and compact["topk_logprobs"].dtype == torch.float16
        assert full["topk_ids"].dtype == torch.int64 and full["topk_logprobs"].dtype == torch.float32
        assert torch.equal(compact["topk_ids"].long(), full["topk_ids"])
        assert torch.equal(compact["topk_logprobs"].float(), full["topk_logprobs"])  # float16 is what is stored
        for key in ("example_id", "input_ids", "positions", "tail_logmass"):
            assert (compact[key] == full[key]) if key == "example_id" else torch.equal(compact[key], full[key])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_decoding_some_rows_gives_those_examples_and_holds_only_their_positions(gpt2_cache, data):
    # A data-parallel rank decodes only the examples of its own batches (amid.loader).
    cache = open_cache(gpt2_cache)
    shard = data.draw(st.integers(0, len(cache.shards) - 1))
    everything = list(cache.iter_shard(shard, compact=True))
    rows = data.draw(st.lists(st.integers(0, len(everything) - 1), unique=True))
    some = list(cache.iter_shard(shard, compact=True, rows=np.array(rows, dtype=np.int64)))
    assert [e["example_id"] for e in some] == [everything[r]["example_id"] for r in rows]
    for ex, r in zip(some, rows):
        for key in ("input_ids", "positions", "topk_ids", "topk_logprobs", "tail_logmass"):
            assert ex[key].dtype == everything[r][key].dtype and torch.equal(ex[key], everything[r][key]), key
    if some:
        positions = sum(len(e["positions"]) for e in some)
        assert some[0]["topk_ids"].untyped_storage().nbytes() == positions * cache.k * 4  # not the shard's
    with pytest.raises(IndexError, match=f"shard {shard} has {len(everything)} examples"):
        list(cache.iter_shard(shard, rows=np.array([len(everything)])))


def test_cache_info_human_json_and_verify(gpt2_cache):
    runner = CliRunner()
    res = runner.invoke(cli, ["cache-info", str(gpt2_cache), "--verify"])
    assert res.exit_code == 0, res.output
    assert "verified" in res.output and "B/position" in res.output
    res = runner.invoke(cli, ["cache-info", str(gpt2_cache), "--json", "--verify"])
    assert res.exit_code == 0
    info = json.loads(res.stdout)
    assert info["verified"]["examples"] == info["counts"]["examples"] == 14
    assert info["k"] == K and len(info["shards"]) == 4
    assert all(len(f["sha256"]) == 64 for s in info["shards"] for f in s["files"].values())


@pytest.mark.parametrize("version,needle", [(1, "older amid"), (99, "upgrade amid")])
def test_open_cache_refuses_other_format_versions(gpt2_cache, tmp_path, version, needle):
    import shutil

    out = tmp_path / "cache"
    shutil.copytree(gpt2_cache, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": version}))
    with pytest.raises(CacheError, match=needle):
        open_cache(out)
    res = CliRunner().invoke(cli, ["cache-info", str(out)])
    assert res.exit_code == 1 and needle in res.stderr and "Traceback" not in res.output


def _drop_files_of_shard_0(m):
    del m["shards"][0]["files"]
    return m


@pytest.mark.parametrize("edit,needle", [
    (lambda m: [], "not a JSON object"),
    (lambda m: {k: v for k, v in m.items() if k != "shards"}, "no 'shards'"),
    (_drop_files_of_shard_0, "shard 0 does not list its examples and topk files"),
    (lambda m: {**m, "tokenizer": "x"}, "'tokenizer' is"),
    (lambda m: {**m, "k": "x"}, "'k' is"),
    (lambda m: {**m, "counts": {**m["counts"], "examples": None}}, "counts.examples"),
])
def test_malformed_manifest_is_refused_in_one_line(gpt2_cache, tmp_path, edit, needle):
    import shutil

    out = tmp_path / "cache"
    shutil.copytree(gpt2_cache, out)
    (out / "manifest.json").write_text(json.dumps(edit(json.loads((out / "manifest.json").read_text()))))
    with pytest.raises(CacheError, match=needle):
        open_cache(out)
    res = CliRunner().invoke(cli, ["cache-info", str(out), "--verify"])
    assert res.exit_code == 1 and "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    assert res.stderr.startswith(f"Error: {out / 'manifest.json'}") and len(res.stderr.strip().splitlines()) == 1


def test_checksum_messages_say_what_differs(gpt2_cache, tmp_path):
    import shutil

    out = tmp_path / "cache"
    shutil.copytree(gpt2_cache, out)
    victim = out / "topk" / "shard-000000.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="does not match its sha256 in the manifest"):
        open_cache(out).check()
    victim.write_bytes(bytes(data[:-3]))
    with pytest.raises(CacheError, match=f"is {len(data) - 3:,} bytes, the manifest says {len(data):,}"):
        open_cache(out).check()


def test_shards_of_an_earlier_cache_are_removed_and_flagged(teachers, data_files, gpt2_cache, tmp_path):
    # A cache directory whose manifest and progress were deleted, then filled with another cache
    # (fewer shards): the earlier shards must not stay beside the new ones.
    import shutil

    out = tmp_path / "cache"
    shutil.copytree(gpt2_cache, out)
    before = len(list((out / "topk").glob("*.parquet")))
    for f in [out / "manifest.json", *out.glob("progress-rank*.json")]:
        f.unlink()
    run_cache(teacher=str(teachers["gpt2"]), data=str(data_files["instruction"]), out=str(out),
              examples_per_shard=16, batch_size=3)
    cache = open_cache(out)
    assert len(cache.shards) < before
    for part in ("examples", "topk"):
        assert sorted(f.name for f in (out / part).glob("*.parquet")) == sorted(
            Path(r["files"][part]["file"]).name for r in cache.shards)
    assert cache.check()["shards"] == len(cache.shards)
    shutil.copy(gpt2_cache / "topk" / "shard-000002.parquet", out / "topk" / "shard-000002.parquet")
    with pytest.raises(CacheError, match="topk/shard-000002.parquet: no shard of .* lists it"):
        open_cache(out).check()


def test_content_id_follows_the_shards_not_the_path(gpt2_cache, teachers, data_files, tmp_path):
    import shutil

    shutil.copytree(gpt2_cache, tmp_path / "moved")
    assert open_cache(tmp_path / "moved").content_id == open_cache(gpt2_cache).content_id
    run_cache(teacher=str(teachers["gpt2"]), data=str(data_files["instruction"]), out=str(tmp_path / "relaid"),
              examples_per_shard=5, batch_size=3)
    assert open_cache(tmp_path / "relaid").content_id != open_cache(gpt2_cache).content_id


def test_open_cache_refuses_non_cache_and_incomplete(tmp_path):
    with pytest.raises(CacheError, match="not an amid cache"):
        open_cache(tmp_path)
    res = CliRunner().invoke(cli, ["cache-info", str(tmp_path)])
    assert res.exit_code != 0 and "not an amid cache" in res.output and res.exception.__class__ is SystemExit


# ----------------------------------------------------------------------------------------------
# Refusals: one clear line, nothing written


def _refused(args: list[str], *needles: str) -> str:
    res = CliRunner().invoke(cli, ["cache-teacher", "--quiet", *args])
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, SystemExit), f"unexpected exception {res.exception!r}"
    err = res.stderr.strip().splitlines()
    # the CLI echoes its config first; the refusal is the last line, starting with "Error:"
    assert err and err[-1].startswith("Error: "), res.stderr
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in err[-1], err[-1]
    return err[-1]


def test_a_dataset_folder_with_examples_or_topk_subfolders_is_not_taken_for_a_cache(teachers, data_files, gpt2_cache,
                                                                                    tmp_path):
    # Its examples/train.parquet looks like a part directory of a cache: a cache written there
    # would delete it as "a shard of an earlier cache". Refused, naming it; nothing is touched.
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "mydata"
    (out / "examples").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["a"], "response": ["b"]}), out / "examples" / "train.parquet")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    msg = _refused(["--teacher", str(teachers["gpt2"]), "--data", str(data_files["instruction"]), "--out", str(out)],
                   "is not an amid cache", "examples/train.parquet")
    assert "choose an empty or new --out" in msg
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    # Nor is such a file kept in a cache being finished (a resume): readers of the part would mix it in.
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(gpt2_cache, partial)
    (partial / "manifest.json").unlink()  # progress files stay: a cache to finish
    shutil.copy(out / "examples" / "train.parquet", partial / "examples" / "train.parquet")
    _refused(["--teacher", str(teachers["gpt2"]), "--data", str(data_files["instruction"]), "--out", str(partial),
              "--examples-per-shard", "4", "--batch-size", "3"], "examples/train.parquet: not a file of this cache",
             "move it out")
    assert (partial / "examples" / "train.parquet").exists() and not (partial / "manifest.json").exists()
    # And a cache's own clean-up deletes only files named as its shards.
    from amid.cache import unlisted_files

    (out / "topk").mkdir()
    (out / "topk" / "shard-000007.parquet").write_bytes(b"")
    assert unlisted_files(out, [], shards_only=True) == [out / "topk" / "shard-000007.parquet"]
    assert len(unlisted_files(out, [])) == 2  # what cache.check() flags: both would mix into a reader


def test_refusals_leave_no_output(teachers, tmp_path):
    t = str(teachers["gpt2"])
    out = tmp_path / "out"
    base = ["--teacher", t, "--out", str(out)]

    _refused([*base, "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl", "no such file")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": oops}\n')
    _refused([*base, "--data", str(bad)], f"{bad}:3", "malformed")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _refused([*base, "--data", str(empty)], "empty.jsonl", "no records")

    fields = write_jsonl(tmp_path / "fields.jsonl", [{"question": "a", "answer": "b"}])
    _refused([*base, "--data", str(fields)], "question", "--prompt-field")
    _refused([*base, "--data", str(fields), "--template", "plain", "--prompt-field", "question"],
             "response", "needs field")

    long = write_jsonl(tmp_path / "long.jsonl", instruction_records(6, seed=3))
    msg = _refused([*base, "--data", str(long), "--max-length", "20"], "--max-length", "--overflow")
    assert "long.jsonl:1: the example has" in msg

    assert not out.exists(), "a refusal must not create the output directory"


def test_overflow_truncate_and_skip_are_counted(teachers, tmp_path):
    records = instruction_records(10, seed=3)
    data = write_jsonl(tmp_path / "d.jsonl", records)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teachers["gpt2"])
    lengths = [len(expected_example(tok, r, "instruction")[0]) for r in records]
    max_len = sorted(lengths)[len(lengths) // 2]
    too_long = sum(n > max_len for n in lengths)
    assert 0 < too_long < len(records)

    kw = dict(teacher=str(teachers["gpt2"]), data=str(data), max_length=max_len)
    m = run_cache(out=str(tmp_path / "skip"), overflow="skip", **kw)
    assert m["counts"]["skipped_too_long"] == too_long and m["counts"]["examples"] == len(records) - too_long
    kept = [e["example_id"] for e in open_cache(tmp_path / "skip")]
    assert kept == [i for i, n in enumerate(lengths) if n <= max_len]

    m = run_cache(out=str(tmp_path / "trunc"), overflow="truncate", **kw)
    assert m["counts"]["truncated"] == too_long and m["counts"]["examples"] == len(records)
    for ex, n in zip(open_cache(tmp_path / "trunc"), lengths):
        assert len(ex["input_ids"]) == min(n, max_len)
        assert int(ex["positions"][-1]) == len(ex["input_ids"]) - 2
    res = CliRunner().invoke(cli, ["cache-info", str(tmp_path / "trunc")])
    assert f"{too_long} / 0" in res.output


def test_refuses_cache_of_another_teacher_or_tokenizer(teachers, data_files, gpt2_cache, tmp_path):
    import shutil

    out = tmp_path / "cache"
    shutil.copytree(gpt2_cache, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # Same tokenizer, other weights.
    other = save_teacher(tmp_path / "other", "gpt2", tokenizer_vocab=300, seed=1)
    msg = _refused(["--teacher", str(other), "--data", str(data_files["instruction"]), "--out", str(out),
                    "--examples-per-shard", "4", "--batch-size", "3"], str(out), "teacher")
    assert "tokenizer" not in msg
    # Another tokenizer (and model).
    with pytest.raises(CacheError, match="tokenizer"):
        run_cache(teacher=str(teachers["llama"]), data=str(data_files["instruction"]), out=str(out),
                  examples_per_shard=4, batch_size=3)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before, "the existing cache must be left intact"
    open_cache(out).check()

    # An in-progress cache of teacher A is protected the same way.
    (out / "manifest.json").unlink()
    with pytest.raises(CacheError, match="teacher"):
        run_cache(teacher=str(other), data=str(data_files["instruction"]), out=str(out),
                  examples_per_shard=4, batch_size=3)


def test_refuses_cache_of_edited_data(teachers, tmp_path):
    """Same file name, same record count, different content: not the same cache (a resume would
    mix old and new examples; a complete cache would silently be stale)."""
    recs = instruction_records(6, seed=4)
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    out = tmp_path / "cache"
    kw = dict(teacher=str(teachers["gpt2"]), data=str(data), out=str(out))
    run_cache(**kw)
    recs[2]["response"] = "an edited response"
    write_jsonl(data, recs)
    with pytest.raises(CacheError, match="different data"):
        run_cache(**kw)


def test_refuses_nonempty_non_cache_directory(teachers, data_files, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    _refused(["--teacher", str(teachers["gpt2"]), "--data", str(data_files["text"]), "--out", str(out)],
             "not an amid cache")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # An empty existing directory is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    run_cache(teacher=str(teachers["gpt2"]), data=str(data_files["text"]), out=str(empty), limit=2)
    assert open_cache(empty).manifest["counts"]["examples"] == 2
    # A hidden entry that is not a cache's (a repository, say) still makes it foreign.
    hidden = tmp_path / "hidden"
    (hidden / ".git").mkdir(parents=True)
    _refused(["--teacher", str(teachers["gpt2"]), "--data", str(data_files["text"]), "--out", str(hidden)],
             "not an amid cache")
    # One where another rank is just writing its first progress file (torchrun start-up) is fine.
    racing = tmp_path / "racing"
    racing.mkdir()
    (racing / ".progress-rank1.json.tmp-4242").write_text("{")
    run_cache(teacher=str(teachers["gpt2"]), data=str(data_files["text"]), out=str(racing), limit=2)
    assert open_cache(racing).manifest["counts"]["examples"] == 2


# ----------------------------------------------------------------------------------------------
# Standard readers


def _rows_by_example(examples: list[dict], topk: list[dict], k: int) -> dict[int, dict]:
    """Join the two standard-reader tables the way the format documents: an example's top-k rows
    are [topk_row, topk_row + P·k) of its shard's topk file."""
    out = {}
    for ex in examples:
        rows = topk[ex["topk_row"]: ex["topk_row"] + len(ex["positions"]) * k]
        out[ex["example_id"]] = {**ex, "topk_ids": np.array([r["topk_id"] for r in rows]).reshape(-1, k),
                                 "topk_logprobs": np.array([r["topk_logprob"] for r in rows], np.float32).reshape(-1, k)}
    return out


def test_shards_readable_without_amid(gpt2_cache, tmp_path):
    import datasets
    import pyarrow.dataset as pads

    cache = open_cache(gpt2_cache)
    k = cache.manifest["k"]
    ours = list(cache)
    # A stale temporary file must be ignored by the standard readers too.
    junk = [gpt2_cache / part / ".shard-000000.parquet.tmp-1" for part in ("examples", "topk")]
    for f in junk:
        f.write_bytes(b"junk")
    try:
        # pyarrow.dataset over each part's directory: every example once, every top-k row once.
        table = pads.dataset(gpt2_cache / "examples", format="parquet").to_table()
        assert table.num_rows == len(ours) == cache.manifest["counts"]["examples"]
        assert pads.dataset(gpt2_cache / "topk", format="parquet").count_rows() == cache.num_positions * k
        joined = {}
        for i in range(len(cache.shards)):
            ex = pads.dataset(cache.shard_path(i, "examples"), format="parquet").to_table().to_pylist()
            tk = pads.dataset(cache.shard_path(i, "topk"), format="parquet").to_table().to_pylist()
            joined.update(_rows_by_example(ex, tk, k))
        for ex in ours:
            row = joined[ex["example_id"]]
            assert row["input_ids"] == ex["input_ids"].tolist()
            assert row["positions"] == ex["positions"].tolist()
            assert np.array_equal(row["topk_ids"], ex["topk_ids"].numpy())
            assert np.array_equal(row["topk_logprobs"], ex["topk_logprobs"].numpy())
            assert np.array_equal(np.array(row["tail_logmass"], np.float32), ex["tail_logmass"].numpy())

        # Hugging Face datasets, one shard's pair of files.
        load = lambda part: datasets.load_dataset(  # noqa: E731
            "parquet", data_files=str(cache.shard_path(1, part)), split="train", cache_dir=str(tmp_path / "hf"))
        hf_ex, hf_tk = load("examples"), load("topk")
        assert hf_ex.num_rows == cache.shards[1]["examples"] and hf_tk.num_rows == cache.shards[1]["positions"] * k
        joined = _rows_by_example(list(hf_ex), list(hf_tk), k)
        shard_examples = [ex for ex in ours if ex["example_id"] in joined]
        assert len(shard_examples) == cache.shards[1]["examples"]
        for ex in shard_examples:
            row = joined[ex["example_id"]]
            assert row["input_ids"] == ex["input_ids"].tolist()
            assert np.array_equal(row["topk_ids"], ex["topk_ids"].numpy())
            assert np.array_equal(row["topk_logprobs"], ex["topk_logprobs"].numpy())
            assert np.array_equal(np.array(row["tail_logmass"], np.float32), ex["tail_logmass"].numpy())
        whole = datasets.load_dataset("parquet", data_dir=str(gpt2_cache / "examples"), split="train",
                                      cache_dir=str(tmp_path / "hf"))
        assert sorted(whole["example_id"]) == sorted(ex["example_id"] for ex in ours)
    finally:
        for f in junk:
            f.unlink()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_teacher_topk_matches_float64(dtype, temperature, monkeypatch):
    # Several chunks (a budget of 3 rows of V = 500), −inf columns, a row whose top-k hold all but
    # ~e^-50 of the mass (the tail must come from the complement, not 1 − Σ top-k), k ≥ V.
    from amid import bins

    monkeypatch.setattr(bins, "CPU_CHUNK_ELEMENTS", 1500)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(11, 500, generator=gen) * 4).to(dtype)
    logits[:, -7:] = -math.inf
    logits[3, :16] = 60.0
    ids, lps, tail = teacher_topk(logits, 16, temperature)
    z = logits.double() / temperature
    logp = torch.log_softmax(z, dim=-1)
    # The top-k values (ties at the k-th place may pick either id).
    torch.testing.assert_close(z.gather(1, ids), torch.topk(z, 16, dim=-1).values, rtol=0, atol=0)
    assert ids.dtype == torch.int64 and lps.dtype == tail.dtype == torch.float32
    torch.testing.assert_close(lps.double(), logp.gather(1, ids), rtol=0, atol=2e-6 * temperature)
    want_tail = torch.logsumexp(logp.scatter(1, ids, -math.inf), dim=-1)
    torch.testing.assert_close(tail.double(), want_tail, rtol=1e-5, atol=2e-6)
    assert math.isfinite(tail[3].item()) and tail[3].item() < -20 / temperature  # 1 − Σ top-k is 0 in float32
    ids_all, lps_all, tail_all = teacher_topk(logits[:2, :9], 16)  # k ≥ V: every entry, no tail
    assert ids_all.shape == (2, 9) and torch.isneginf(tail_all).all()
    torch.testing.assert_close(lps_all.exp().sum(dim=-1), torch.ones(2), rtol=0, atol=1e-6)


def test_another_spelling_of_the_same_data_and_teacher_is_the_same_cache(teachers, data_files, tmp_path, monkeypatch):
    # Started with relative paths, rerun with absolute ones (or through a symlink): the same cache,
    # not "a different data"; the manifest keeps the spelling it was started with.
    import shutil

    shutil.copy(data_files["instruction"], tmp_path / "inst.jsonl")
    (tmp_path / "teacher-link").symlink_to(teachers["gpt2"], target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    first = run_cache(teacher="teacher-link", data="inst.jsonl", out="cache", examples_per_shard=4, batch_size=3)
    logs = []
    again = cache_teacher(CacheConfig(teacher=str(teachers["gpt2"]), data=str(tmp_path / "inst.jsonl"),
                                      out=str(tmp_path / "cache"), examples_per_shard=4, batch_size=3),
                          progress=False, log=logs.append)
    assert any("already complete" in m for m in logs) and again["fingerprint"] == first["fingerprint"]
    assert again["data"]["source"] == "inst.jsonl" and again["teacher"]["name_or_path"] == "teacher-link"
    # From another directory the relative spellings name nothing (the run was started elsewhere), and
    # a copy of the data or of the teacher is another path: the same tokenized examples and teacher
    # weights are the same cache all the same.
    shutil.copytree(teachers["gpt2"], tmp_path / "teacher-copy")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "other.jsonl").write_text((tmp_path / "inst.jsonl").read_text())  # equal bytes, another file
    logs.clear()
    again = cache_teacher(CacheConfig(teacher=str(tmp_path / "teacher-copy"), data=str(tmp_path / "other.jsonl"),
                                      out=str(tmp_path / "cache"), examples_per_shard=4, batch_size=3),
                          progress=False, log=logs.append)
    assert any("already complete" in m for m in logs) and again["data"]["source"] == "inst.jsonl"
    code = tmp_path / "teacher-code"  # equal weights, but model code of its own: not known to be equal
    shutil.copytree(teachers["gpt2"], code)
    (code / "modeling_custom.py").write_text("# trust_remote_code model code\n")
    with pytest.raises(CacheError, match="different teacher"):
        run_cache(teacher=str(code), data=str(tmp_path / "inst.jsonl"), out=str(tmp_path / "cache"),
                  examples_per_shard=4, batch_size=3)
    lines = (tmp_path / "inst.jsonl").read_text().splitlines()
    (tmp_path / "other.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same records, other order
    with pytest.raises(CacheError, match="different data"):
        run_cache(teacher=str(tmp_path / "teacher-copy"), data=str(tmp_path / "other.jsonl"),
                  out=str(tmp_path / "cache"), examples_per_shard=4, batch_size=3)


def test_refusal_names_the_data_setting_that_changed(teachers, data_files, gpt2_cache):
    with pytest.raises(CacheError, match=r"different data \(examples_per_shard 4 -> 16\)"):
        run_cache(teacher=str(teachers["gpt2"]), data=str(data_files["instruction"]), out=str(gpt2_cache),
                  examples_per_shard=16, batch_size=3)
    res = CliRunner().invoke(cli, ["cache-teacher", "--teacher", str(teachers["gpt2"]), "--data",
                                   str(data_files["instruction"]), "--out", str(gpt2_cache), "--limit", "-3"])
    assert res.exit_code == 2 and "--limit" in res.output


def test_a_missing_local_model_directory_is_named(tmp_path, data_files):
    from amid.models import check_model_name

    for name in ("./nope", str(tmp_path / "nope"), "../nope"):
        with pytest.raises(ValueError, match=f"--teacher {name}: no such local model directory"):
            check_model_name(name, "--teacher")
    with pytest.raises(ValueError, match="'~' is not expanded here; pass /"):
        check_model_name("~/some-model", "--teacher")
    check_model_name("gpt2", "--teacher")  # a hub name: left to transformers
    check_model_name("owner/name", "--teacher")
    check_model_name(str(tmp_path), "--teacher")
    res = CliRunner().invoke(cli, ["cache-teacher", "--teacher", "./nope", "--data", str(data_files["text"]),
                                   "--out", str(tmp_path / "c")])
    assert res.exit_code == 1 and "no such local model directory" in res.stderr and not (tmp_path / "c").exists()


def test_an_example_longer_than_the_teachers_context_is_named_by_line(teachers, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"text": "short"}) + "\n\n" + json.dumps({"text": "the cat sat on a mat " * 400}) + "\n")
    with pytest.raises(DataError, match=rf"{data}:3: the example has \d+ tokens, more than the teacher's context of 256; pass --max-length 256"):
        run_cache(teacher=str(teachers["gpt2"]), data=str(data), out=str(tmp_path / "c"), max_length=100000)
    assert not (tmp_path / "c").exists()


def test_a_cache_started_by_another_amid_version_says_so():
    from amid.cache import mismatch_message

    header = {"format_version": 2, "teacher": {"n": 1}, "tokenizer": {"v": 1}, "k": 4, "temperature": 1.0,
              "data": {"source": "d.jsonl", "examples_sha256": "aa"}, "amid_version": "0.2.0"}
    newer = {**header, "data": {"source": "d.jsonl", "examples_sha256": "bb"}, "amid_version": "0.3.0"}
    message = mismatch_message(Path("no-such-cache"), header, newer)
    assert "made by amid 0.2.0, which turned the same data into other examples than amid 0.3.0 does (0.3.0: " in message
    assert "0.4.0" not in message
    assert "0.4.0: a chat response" in mismatch_message(Path("c"), header, {**newer, "amid_version": "0.4.0"})
    assert "0.5.0: a chat answer" in mismatch_message(Path("c"), {**header, "amid_version": "0.4.0"},
                                                      {**newer, "amid_version": "0.5.0"})
    assert message.endswith("or finish this one with amid 0.2.0")  # incomplete: no manifest there
    same_version = {**newer, "amid_version": "0.2.0"}
    assert "different data (the examples' content)" in mismatch_message(Path("c"), header, same_version)


def test_chat_messages_data_is_cached_turn_by_turn(tmp_path):
    from helpers import CHATML_TEMPLATE, save_teacher
    from transformers import AutoTokenizer

    teacher = save_teacher(tmp_path / "chat_teacher", "qwen2", chat_template=CHATML_TEMPLATE)
    conversation = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                    {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}] * 3)
    manifest = run_cache(teacher=str(teacher), data=str(data), out=str(tmp_path / "c"))
    assert manifest["data"]["template"] == "chat" and manifest["data"]["fields"]["messages"] == "messages"
    ex = next(iter(open_cache(tmp_path / "c")))
    tok = AutoTokenizer.from_pretrained(teacher)
    ids = ex["input_ids"].tolist()
    assert tok.decode([ids[t + 1] for t in ex["positions"].tolist()]) == "Blue.<|im_end|>Red.<|im_end|>"
    # Data without messages keeps the identity it always had (no messages field recorded).
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Q?", "response": "A."}] * 3)
    manifest = run_cache(teacher=str(teacher), data=str(plain), out=str(tmp_path / "c2"), template="chat")
    assert "messages" not in manifest["data"]["fields"]


def test_chat_template_settings_are_part_of_the_caches_data_and_its_evaluation(tmp_path):
    from helpers import NO_THINKING_TEMPLATE, save_teacher

    from amid.sweep import _eval_template

    teacher = save_teacher(tmp_path / "teacher", "qwen2", chat_template=NO_THINKING_TEMPLATE)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?", "response": "A."}] * 3)
    off = {"enable_thinking": False}
    manifest = run_cache(teacher=str(teacher), data=str(data), out=str(tmp_path / "c"), template="chat",
                         chat_template_kwargs=off)
    assert manifest["data"]["chat_template_kwargs"] == off
    assert _eval_template(manifest)["chat_template_kwargs"] == off  # sweep's --eval-data reads it the same way
    with pytest.raises(CacheError, match="different data"):  # other template arguments: other examples
        run_cache(teacher=str(teacher), data=str(data), out=str(tmp_path / "c"), template="chat",
                  chat_template_kwargs={"enable_thinking": True})
    plain = run_cache(teacher=str(teacher), data=str(data), out=str(tmp_path / "c2"), template="chat")
    assert "chat_template_kwargs" not in plain["data"] and "chat_template_kwargs" not in _eval_template(plain)
    assert "chat_turns" not in plain["data"]  # the default: the identity caches always had
    last = run_cache(teacher=str(teacher), data=str(data), out=str(tmp_path / "c3"), template="chat", chat_turns="last")
    assert last["data"]["chat_turns"] == "last" and _eval_template(last)["chat_turns"] == "last"
    # Without the chat template they do nothing: said, and not made part of the cache's identity.
    lines = []
    other = cache_teacher(CacheConfig(teacher=str(teacher), data=str(data), out=str(tmp_path / "c4"), template="plain",
                                      chat_template_kwargs=off, chat_turns="last"), progress=False, log=lines.append)
    assert any("apply to the chat template only; template plain ignores them" in line for line in lines)
    assert "chat_template_kwargs" not in other["data"] and "chat_turns" not in other["data"]


def test_conversations_a_template_rewrites_are_cached_one_example_per_turn(tmp_path):
    from helpers import THINKING_TEMPLATE, save_teacher
    from click.testing import CliRunner

    from amid.cli import main
    from amid.data import TURN_SHIFT, record_of
    from amid.loader import scan, split

    teacher = save_teacher(tmp_path / "thinking_teacher", "qwen2", chat_template=THINKING_TEMPLATE)
    talk = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nBlue."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nRed."}]
    data = write_jsonl(tmp_path / "talk.jsonl", [{"messages": talk}] * 40)
    lines = []
    manifest = cache_teacher(CacheConfig(teacher=str(teacher), data=str(data), out=str(tmp_path / "c")),
                             progress=False, log=lines.append)
    assert manifest["counts"]["examples"] == 80 and manifest["counts"]["split_conversations"] == 40
    assert any("of 40 conversations differently" in line and f"the first: {data}:1" in line for line in lines)
    cache = open_cache(tmp_path / "c")
    ids = sorted(ex["example_id"] for ex in cache)
    assert ids == list(range(40)) + [r + (1 << TURN_SHIFT) for r in range(40)]  # the second turns: record + 2^40
    # The held-out split hashes the record: both turns of a conversation fall on the same side.
    metas = scan(cache)
    train, held = split(metas, 0.25, 1000)
    held_ids = {int(i) for m, rows in zip(metas, held) for i in m.example_ids[rows]}
    assert 0 < len(held_ids) < 80 and sum(map(len, train)) + len(held_ids) == 80
    assert held_ids == {r + n * (1 << TURN_SHIFT) for r in {record_of(i) for i in held_ids} for n in (0, 1)}
    out = CliRunner().invoke(main, ["cache-info", str(tmp_path / "c")])
    assert out.exit_code == 0 and "conversations split at their turns" in out.output


def test_a_shard_that_cannot_be_written_is_named_and_leaves_no_temporary(teachers, data_files, tmp_path, monkeypatch):
    import amid.cache as cache_mod

    kw = dict(teacher=str(teachers["gpt2"]), data=str(data_files["instruction"]), examples_per_shard=2, batch_size=2)
    out = tmp_path / "out"
    real = cache_mod.os.fsync

    def full_after_two(fd):  # shards 0 and 1 fit on the disk, shard 2 does not
        if "shard-000002" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(28, "No space left on device")
        return real(fd)

    monkeypatch.setattr(cache_mod.os, "fsync", full_after_two)
    with pytest.raises(CacheError, match=r"shard-000002\.parquet: cannot be written \(No space left on device\); "
                                         r"free space and rerun the same command"):
        run_cache(out=str(out), **kw)
    assert not _temporaries(out)
    monkeypatch.setattr(cache_mod.os, "fsync", real)
    run_cache(out=str(out), **kw)  # the rerun continues from the two shards written
    open_cache(out)


def test_the_same_cache_teacher_twice_at_once_is_refused_before_it_writes(teachers, data_files, tmp_path):
    import fcntl

    kw = dict(teacher=str(teachers["gpt2"]), data=str(data_files["instruction"]), examples_per_shard=2, batch_size=2)
    out = tmp_path / "out"
    (out / "topk").mkdir(parents=True)
    running = out / "topk" / ".shard-000000.parquet.tmp-4242"
    running.write_bytes(b"the running one's shard, half written")
    with open(out / ".lock-rank0", "a") as held:  # what the running cache-teacher holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CacheError, match="another amid cache-teacher is writing this cache; wait for it"):
            run_cache(out=str(out), **kw)
        assert running.exists()  # not taken for a killed writer's and removed
    with pytest.raises(DataError) as failed:  # a run that fails holding the lock ...
        run_cache(out=str(out), **{**kw, "data": str(tmp_path / "missing.jsonl")})
    run_cache(out=str(out), **kw)  # ... has let it go, even while its exception is alive
    assert failed.value is not None
    open_cache(out, verify=True)


def test_a_temporary_of_a_live_writer_is_left_alone(teachers, data_files, tmp_path):
    # A job of another world size on the same --out holds another rank's lock: its temporaries
    # are told apart from a killed writer's by their PID.
    kw = dict(teacher=str(teachers["gpt2"]), data=str(data_files["instruction"]), examples_per_shard=2, batch_size=2)
    out = tmp_path / "out"
    (out / "topk").mkdir(parents=True)
    live = out / "topk" / f".shard-000000.parquet.tmp-{os.getppid()}"  # a process that runs
    dead = out / "topk" / f".shard-000001.parquet.tmp-{_dead_pid()}"
    live.write_bytes(b"being written")
    dead.write_bytes(b"left by a killed writer")
    run_cache(out=str(out), **kw)
    assert live.exists() and not dead.exists()

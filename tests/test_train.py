"""The trainer (issue 4): a tiny teacher → cache → student, end to end on CPU.

Everything here builds its own tokenizer and models, so it needs no files outside the repository;
one slow test also distills the real stories260K model from ../shared when that is present.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from amid.cache import open_cache
from amid.loader import Loader, Plan, Position, scan, split
from amid.losses import PRESETS, LossConfig
from amid.teacher import CacheConfig, cache_teacher
from amid.train import TrainConfig, TrainError, TrainingDiverged, train

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SHARED = Path(__file__).resolve().parents[2] / "shared"
WORDS = (
    "the a cat dog bird fish sun moon tree house red blue green small big happy sad runs jumps sings "
    "sleeps eats sees likes finds near under over with and but then today night morning"
).split()


# ----------------------------------------------------------------------------------------------
# Fixtures: tokenizer, teacher, teacher-sampled data, cache, students


def make_tokenizer(directory: Path, words=WORDS):
    """A real word-level tokenizer (tokenizers library), saved like any hub tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(directory)
    return fast


def make_llama(directory: Path, vocab: int, seed: int, hidden=32, layers=2, head_scale=1.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=1)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(directory)
    return model


def make_gpt2(directory: Path, vocab: int, seed: int, dropout=0.0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=dropout,
                     embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=2, eos_token_id=3)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A peaked random teacher, 96 texts sampled from it, their k=8 cache and a Llama student."""
    root = tmp_path_factory.mktemp("train")
    tokenizer = make_tokenizer(root / "teacher")
    vocab = len(tokenizer)
    teacher = make_llama(root / "teacher", vocab, seed=1, head_scale=12.0)
    make_tokenizer(root / "student")
    make_llama(root / "student", vocab, seed=2)

    torch.manual_seed(0)
    with torch.no_grad():
        sampled = teacher.generate(torch.full((96, 1), 2), do_sample=True, max_new_tokens=30, min_new_tokens=30,
                                   suppress_tokens=[0, 1, 2, 3], pad_token_id=1)
    lengths = torch.randint(8, 31, (96,), generator=torch.Generator().manual_seed(0))
    records = [{"text": tokenizer.decode(row[1: 1 + n])} for row, n in zip(sampled, lengths.tolist())]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cache_teacher(CacheConfig(teacher=str(root / "teacher"), data=str(data), out=str(root / "cache"), top_k=8,
                              max_length=64, examples_per_shard=16, device="cpu"), progress=False, log=lambda m: None)
    return {"root": root, "cache": str(root / "cache"), "student": str(root / "student"),
            "teacher": str(root / "teacher"), "vocab": vocab}


def config(world, out, **kw) -> TrainConfig:
    base = dict(cache=world["cache"], student=world["student"], out=str(out), lr=5e-3, max_steps=12,
                batch_size=8, warmup_steps=0, eval_fraction=0.2, eval_every=1000, log_every=1, save_every=1000,
                device="cpu", dtype="fp32", progress=False, num_workers=2, shuffle_buffer=32)
    base.update(kw)
    return TrainConfig(**base)


def quiet(_message: str) -> None:
    pass


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


# ----------------------------------------------------------------------------------------------
# Training lowers the held-out KL to the teacher


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_lowers_heldout_kl(world, tmp_path, preset):
    summary = train(config(world, tmp_path / "run", preset=preset), log=quiet)
    before, after = summary["initial_eval"]["eval_kl"], summary["eval"]["eval_kl"]
    assert math.isfinite(after) and after < 0.9 * before, (preset, before, after)


@pytest.mark.parametrize("alpha", [-3.0, 0.0, 0.5, 1.0, 3.0])
def test_every_alpha_lowers_heldout_kl(world, tmp_path, alpha):
    summary = train(config(world, tmp_path / "run", preset="amid", alpha=alpha), log=quiet)
    before, after = summary["initial_eval"]["eval_kl"], summary["eval"]["eval_kl"]
    assert math.isfinite(after) and after < 0.9 * before, (alpha, before, after)


def test_outputs_and_metrics(world, tmp_path):
    out = tmp_path / "run"
    cfg = config(world, out, max_steps=6, eval_every=3, log_every=2, preset="taid",
                 schedule="linear", warmup_steps=2)
    train(cfg, log=quiet)
    saved = json.loads((out / "config.json").read_text())
    assert TrainConfig.from_dict(saved) == cfg
    resolved = saved["resolved"]  # what the settings came to: the preset's loss, the machine's choices
    assert resolved["loss"] == {**dataclasses.asdict(LossConfig.preset("taid")), "name": "taid"}
    assert resolved["loss"]["stop_grad_r"] is True and resolved["loss"]["lam_end"] == 1.0
    assert (resolved["device"], resolved["dtype"], resolved["total_steps"], resolved["warmup_steps"],
            resolved["world_size"]) == ("cpu", "float32", 6, 2, 1)
    assert resolved["loss_path"] == "materialised"  # a small vocabulary: the fused path does not pay
    lines = metrics(out)
    evals = [m for m in lines if "eval_kl" in m]
    assert [m["step"] for m in evals] == [0, 3, 6]
    assert all({"eval_loss", "eval_kl", "eval_ce", "eval_ppl"} <= set(m) for m in evals)
    assert all(math.isclose(m["eval_ppl"], math.exp(m["eval_ce"]), rel_tol=1e-5) for m in evals)
    logs = [m for m in lines if "loss" in m]
    assert [m["step"] for m in logs] == [2, 4, 6]
    assert all(m["tokens_per_s"] > 0 and m["lr"] > 0 for m in logs)
    lams = [m["lam"] for m in logs]  # TAID's λ rises over training
    assert lams == sorted(lams) and lams[0] > 0.4
    assert (out / "checkpoint" / "trainer_state.pt").exists()
    assert list((out / "final").glob("*.safetensors"))


def test_online_full_vocabulary_path_matches_a_full_cache(world, tmp_path):
    # With k = V the cache holds the teacher's whole distribution: the cache path and the online
    # path (teacher logits every step, full_loss) must train the same student the same way, up to
    # the cache's float16 storage of log-probabilities.
    full_cache = tmp_path / "cache_full"
    cache_teacher(CacheConfig(teacher=world["teacher"], data=str(world["root"] / "data.jsonl"), out=str(full_cache),
                              top_k=world["vocab"], max_length=64, examples_per_shard=16, device="cpu"),
                  progress=False, log=quiet)
    kw = dict(cache=str(full_cache), max_steps=6, alpha=0.0, ce_weight=0.1)
    cached = train(config(world, tmp_path / "cached", eval_teacher=world["teacher"], **kw), log=quiet)
    online = train(config(world, tmp_path / "online", online_teacher=world["teacher"], **kw), log=quiet)
    a, b = _losses(tmp_path / "cached"), _losses(tmp_path / "online")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=5e-4), step
    assert online["eval_kl_full"] == pytest.approx(online["eval_kl"], abs=5e-4)
    assert online["eval_kl_full"] < online["initial_eval"]["eval_kl_full"]
    assert cached["eval_kl"] == pytest.approx(online["eval_kl"], abs=5e-4)
    assert cached["eval_kl_full"] == pytest.approx(cached["eval_kl"], abs=5e-4)  # k = V: the bins are the vocabulary


def test_evaluation_in_row_chunks_equals_one_chunk(world, tmp_path, monkeypatch):
    # Held-out batches are evaluated a chunk of logit rows at a time (student and teacher side by
    # side): 3 rows per chunk must give the metrics of one chunk per batch.
    import amid.train as amid_train

    from amid.heads import Head

    kw = dict(max_steps=2, eval_every=1, eval_teacher=world["teacher"], ce_weight=0.2)
    whole = train(config(world, tmp_path / "whole", **kw), log=quiet)
    monkeypatch.setattr(amid_train, "EVAL_CHUNK_ELEMENTS", 3 * world["vocab"] + 1)
    sizes: list[int] = []
    real = Head.logit_chunks

    def spy(self, batch, rows_per_chunk):
        for z in real(self, batch, rows_per_chunk):
            sizes.append(z.shape[0])
            yield z

    monkeypatch.setattr(Head, "logit_chunks", spy)
    chunked = train(config(world, tmp_path / "chunked", **kw), log=quiet)
    assert len(sizes) > 3 and max(sizes) == 3  # every held-out batch went through in chunks of 3 rows
    evals = [[m for m in metrics(tmp_path / run) if "eval_kl" in m] for run in ("whole", "chunked")]
    assert len(evals[0]) == len(evals[1]) == 3
    for a, b in zip(*evals):
        for key in ("eval_loss", "eval_kl", "eval_ce", "eval_kl_full"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert chunked["eval_kl_full"] == pytest.approx(whole["eval_kl_full"], rel=1e-5)


def test_eval_teacher_adds_the_full_vocabulary_kl_and_changes_no_step(world, tmp_path):
    # k = 8 of ~40 tokens: KL over the k + 1 bins is a lower bound of the full KL (data
    # processing; SPEC §4), strictly below it for a student that is not the teacher.
    plain = train(config(world, tmp_path / "plain", max_steps=4, eval_every=2), log=quiet)
    judged = train(config(world, tmp_path / "judged", max_steps=4, eval_every=2, eval_teacher=world["teacher"]),
                   log=quiet)
    assert _losses(tmp_path / "plain") == _losses(tmp_path / "judged")
    assert "eval_kl_full" not in plain
    evals = [m for m in metrics(tmp_path / "judged") if "eval_kl" in m]
    assert [m["step"] for m in evals] == [0, 2, 4]
    for m, ref in zip(evals, [m for m in metrics(tmp_path / "plain") if "eval_kl" in m]):
        assert m["eval_kl"] == ref["eval_kl"]
        assert m["eval_kl_full"] > m["eval_kl"] + 1e-4
    assert judged["eval_kl_full"] < judged["initial_eval"]["eval_kl_full"]
    with pytest.raises(ValueError, match="different teachers"):
        config(world, tmp_path / "x", online_teacher=world["teacher"], eval_teacher=world["student"])
    config(world, tmp_path / "x", online_teacher=world["teacher"], eval_teacher=world["teacher"] + "/")  # one path

    # Not the cache's teacher: more logits, another architecture (refused), another name (a note).
    wide, small = tmp_path / "wide", tmp_path / "small"
    make_tokenizer(wide), make_gpt2(wide, world["vocab"] + 5, seed=3)
    make_tokenizer(small), make_llama(small, world["vocab"], seed=3, hidden=16)
    for other, message in ((wide, "output logits"), (small, "architecture differs")):
        with pytest.raises(TrainError, match=message):
            train(config(world, tmp_path / f"refused_{other.name}", max_steps=1, eval_teacher=str(other)), log=quiet)
        assert not (tmp_path / f"refused_{other.name}").exists()
    said = []
    train(config(world, tmp_path / "renamed", max_steps=1, eval_teacher=world["student"]), log=said.append)
    assert any("is not the name the cache" in m for m in said)

    # A run directory as the teacher: the cache records the model in it, and naming the run again
    # is the same teacher (no note).
    import shutil

    run = tmp_path / "teacher_run"
    shutil.copytree(world["teacher"], run / "final")
    (run / "config.json").write_text('{"cache": "c", "dtype": "auto"}')  # amid's run config, not a model's
    cache = tmp_path / "cache_from_run"
    made = cache_teacher(CacheConfig(teacher=str(run), data=str(world["root"] / "data.jsonl"), out=str(cache),
                                     top_k=8, max_length=64, limit=8, device="cpu"), progress=False, log=quiet)
    assert made["teacher"]["name_or_path"] == str(run / "final")
    said = []
    train(config(world, tmp_path / "from_run", cache=str(cache), max_steps=1, eval_teacher=str(run)), log=said.append)
    assert not any("is not the name the cache" in m for m in said), said


def test_eval_cache_at_another_temperature_is_refused(world, tmp_path):
    hot = tmp_path / "cache_hot"
    cache_teacher(CacheConfig(teacher=world["teacher"], data=str(world["root"] / "data.jsonl"), out=str(hot), top_k=8,
                              max_length=64, temperature=2.0, device="cpu"), progress=False, log=quiet)
    with pytest.raises(TrainError, match="temperature 2.0"):
        train(config(world, tmp_path / "run", eval_cache=str(hot)), log=quiet)
    assert not (tmp_path / "run").exists()


def test_eval_cache_teacher_identity_rules():
    from types import SimpleNamespace

    from amid.train import _check_eval_cache

    def cache(**teacher):
        return SimpleNamespace(path=Path("c"), manifest={"tokenizer": {"v": 1}, "vocab_size": 10, "temperature": 1.0,
                                                         "teacher": {"config": {"n": 1}, **teacher}})

    local = cache(name_or_path="./t", weights_sha256="aa")
    _check_eval_cache(local, cache(name_or_path="/abs/t", weights_sha256="aa", dtype="bfloat16"))  # same weights
    _check_eval_cache(local, cache(name_or_path="org/t", revision="r1"))  # local vs hub: cannot tell, let through
    _check_eval_cache(cache(name_or_path="org/t", revision="r1"), cache(name_or_path="org/t", revision="r1"))
    for other in (cache(name_or_path="./t", weights_sha256="bb"), cache(name_or_path="./t", weights_sha256="aa",
                                                                        config={"n": 2})):
        with pytest.raises(TrainError, match="made by another teacher"):
            _check_eval_cache(other, local)
    with pytest.raises(TrainError, match="made by another teacher"):
        _check_eval_cache(cache(name_or_path="org/u", revision="r1"), cache(name_or_path="org/t", revision="r1"))


def test_eval_cache_of_another_teacher_is_refused_and_of_the_same_one_used(world, tmp_path):
    data = str(world["root"] / "data.jsonl")
    for name, teacher in (("other", world["student"]), ("same", world["teacher"])):  # same tokenizer both
        cache_teacher(CacheConfig(teacher=teacher, data=data, out=str(tmp_path / name), top_k=4, max_length=64,
                                  device="cpu"), progress=False, log=quiet)
    with pytest.raises(TrainError, match="made by another teacher"):
        train(config(world, tmp_path / "run", eval_cache=str(tmp_path / "other")), log=quiet)
    assert not (tmp_path / "run").exists()
    done = train(config(world, tmp_path / "run", max_steps=1, eval_cache=str(tmp_path / "same")), log=quiet)
    assert done["eval_kl"] > 0


# ----------------------------------------------------------------------------------------------
# Checkpoints: plain transformers, resume, NaN


def test_final_model_loads_in_plain_transformers_and_generates(world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    train(config(world, out, max_steps=3), log=quiet)
    for d in (out / "final", out / "checkpoint"):
        model = AutoModelForCausalLM.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        ids = tok("the cat", return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert gen.shape[1] == ids["input_ids"].shape[1] + 5


def test_a_second_trainer_in_a_running_directory_is_refused_before_writing(world, tmp_path):
    import fcntl

    import amid.train as amid_train

    out = tmp_path / "run"
    train(config(world, out, max_steps=2, save_every=1), log=quiet)
    before = {f: f.stat().st_mtime_ns for f in out.rglob("*")}
    with open(out / amid_train.LOCK_FILE, "a") as held:  # what the running trainer holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TrainError, match="another amid train is running in this directory"):
            train(config(world, out, max_steps=4, save_every=1, resume=True), log=quiet)
        assert {f: f.stat().st_mtime_ns for f in out.rglob("*")} == before
    # Released when the holder ends (a killed trainer's process too): the resume goes ahead.
    assert train(config(world, out, max_steps=4, save_every=1, resume=True), log=quiet)["steps"] == 4
    fresh = tmp_path / "fresh"
    train(config(world, fresh, max_steps=1), log=quiet)  # locked once made, released at the end
    with open(fresh / amid_train.LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.parametrize("lm", [False, True], ids=["cache", "cache+lm"])
def test_resume_after_crash_matches_uninterrupted_run(world, tmp_path, monkeypatch, lm):
    # A GPT-2 student with dropout (RNG state matters), a padded vocabulary, gradient
    # accumulation, several windows per epoch and an epoch boundary inside the run (and, with
    # `lm`, a plain-text stream that wraps around its blocks during the run).
    student = tmp_path / "gpt2"
    make_tokenizer(student)
    make_gpt2(student, world["vocab"] + 5, seed=3, dropout=0.1)
    kw = dict(student=str(student), max_steps=8, grad_accum=2, batch_size=6, save_every=3, eval_every=4,
              shuffle_buffer=20, preset="amid", alpha=0.0, ce_weight=0.2)
    if lm:
        kw.update(lm_data=str(world["root"] / "data.jsonl"), lm_length=48, lm_batch_size=3)
    whole = train(config(world, tmp_path / "whole", **kw), log=quiet)

    import amid.train as amid_train

    real = amid_train.learning_rate

    def crash_at_step_5(cfg, step, total):
        if step == 5:
            raise KeyboardInterrupt("simulated kill")
        return real(cfg, step, total)

    monkeypatch.setattr(amid_train, "learning_rate", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(config(world, tmp_path / "resumed", **kw), log=quiet)
    monkeypatch.setattr(amid_train, "learning_rate", real)
    assert max(_losses(tmp_path / "resumed")) == 5  # went past its last checkpoint (step 3)
    with pytest.raises(TrainError, match="--resume"):
        train(config(world, tmp_path / "resumed", **kw), log=quiet)
    resumed = train(config(world, tmp_path / "resumed", resume=True, **kw), log=quiet)

    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6, rel=0), step
    if lm:
        lm_a = {m["step"]: m["lm_loss"] for m in metrics(tmp_path / "whole") if "lm_loss" in m}
        lm_b = {m["step"]: m["lm_loss"] for m in metrics(tmp_path / "resumed") if "lm_loss" in m}
        assert sorted(lm_a) == list(range(1, 9)) and lm_a == pytest.approx(lm_b, abs=1e-6)
    assert resumed["eval"]["eval_kl"] == pytest.approx(whole["eval"]["eval_kl"], abs=1e-6)
    assert resumed["initial_eval"] == pytest.approx(whole["initial_eval"], abs=1e-6)  # from the metrics log
    evals = [m["step"] for m in metrics(tmp_path / "resumed") if "eval_kl" in m]
    assert evals == [0, 4, 8]
    with pytest.raises(TrainError, match="different weight_decay"):
        train(config(world, tmp_path / "resumed", resume=True, **{**kw, "weight_decay": 0.5}), log=quiet)
    # A lower --lr (what a diverged run's message advises) resumes, with a note; so does a longer run.
    logs: list[str] = []
    train(config(world, tmp_path / "resumed", resume=True, **{**kw, "lr": 1e-3, "max_steps": 9}), log=logs.append)
    assert any("note: resuming" in m and "lr 0.005 -> 0.001" in m and "max_steps 8 -> 9" in m for m in logs), logs
    assert sorted(_losses(tmp_path / "resumed")) == list(range(1, 10))


def test_resume_checks_the_cache_by_content_and_the_run_by_location(world, tmp_path):
    # A moved cache and another spelling of --out resume; another cache under the old name, or a
    # damaged checkpoint, are refused in one line before any step.
    import shutil

    train(config(world, tmp_path / "run", max_steps=2, save_every=2), log=quiet)
    shutil.copytree(world["cache"], tmp_path / "moved")
    other_spelling = str(tmp_path / "elsewhere" / ".." / "run")
    (tmp_path / "elsewhere").mkdir()
    train(config(world, other_spelling, cache=str(tmp_path / "moved"), max_steps=3, save_every=3, resume=True),
          log=quiet)
    assert sorted(_losses(tmp_path / "run")) == [1, 2, 3]

    shutil.rmtree(tmp_path / "moved")  # another cache of the same data, in other shards, under that name
    cache_teacher(CacheConfig(teacher=world["teacher"], data=str(world["root"] / "data.jsonl"),
                              out=str(tmp_path / "moved"), top_k=8, max_length=64, examples_per_shard=40,
                              device="cpu"), progress=False, log=quiet)
    with pytest.raises(TrainError, match="not the cache this run was trained on"):
        train(config(world, tmp_path / "run", cache=str(tmp_path / "moved"), max_steps=4, resume=True), log=quiet)

    state = tmp_path / "run" / "checkpoint" / "trainer_state.pt"
    good = state.read_bytes()
    for damaged in (b"garbage\n", good[: len(good) // 2]):
        state.write_bytes(damaged)
        with pytest.raises(TrainError, match="trainer_state.pt: checkpoint cannot be read .*if it is damaged, move") as err:
            train(config(world, tmp_path / "run", max_steps=4, resume=True), log=quiet)
        assert "\n" not in str(err.value)
    state.write_bytes(good)
    weights = tmp_path / "run" / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(TrainError, match="checkpoint: checkpoint cannot be read"):
        train(config(world, tmp_path / "run", max_steps=4, resume=True), log=quiet)

    # A checkpoint of an older amid records no cache_id: it resumes on the same cache path, and
    # another path is refused as another cache (the rule before the record existed).
    def drop_cache_id(run):
        path = run / "checkpoint" / "trainer_state.pt"
        state = torch.load(path, weights_only=False)
        del state["cache_id"]
        torch.save(state, path)

    old = tmp_path / "old"
    train(config(world, old, max_steps=1, save_every=1), log=quiet)
    drop_cache_id(old)
    train(config(world, old, max_steps=2, save_every=1, resume=True), log=quiet)
    assert sorted(_losses(old)) == [1, 2]
    drop_cache_id(old)
    shutil.copytree(world["cache"], tmp_path / "copy")
    with pytest.raises(TrainError, match="different cache"):
        train(config(world, old, cache=str(tmp_path / "copy"), max_steps=3, resume=True), log=quiet)


def test_a_student_with_a_shorter_context_or_a_foreign_out_is_refused_writing_nothing(world, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    short = tmp_path / "short"
    make_tokenizer(short)
    GPT2LMHeadModel(GPT2Config(vocab_size=world["vocab"], n_embd=16, n_layer=1, n_head=2, n_positions=16,
                               bos_token_id=2, eos_token_id=3)).save_pretrained(short)
    with pytest.raises(TrainError, match=r"examples of up to \d+ tokens, but the student .* context of 16 "
                                         r"positions; cache the data with --max-length 16"):
        train(config(world, tmp_path / "run", student=str(short)), log=quiet)
    assert not (tmp_path / "run").exists()
    # --out naming the student (a model directory) or the cache: refused, before and after --resume.
    before = (Path(world["student"]) / "config.json").read_text()
    for out in (world["student"], world["cache"]):
        for resume in (False, True):
            with pytest.raises(TrainError, match="holds a model or a cache, not an amid run"):
                train(config(world, out, resume=resume), log=quiet)
    assert (Path(world["student"]) / "config.json").read_text() == before
    assert not (Path(world["cache"]) / "metrics.jsonl").exists()


def test_a_cache_held_out_whole_is_refused_with_what_to_do(world, tmp_path):
    with pytest.raises(TrainError, match=r"no training examples left after holding out --eval-fraction 0.9999 .*pass "
                                         r"--eval-fraction 0 or hold out a separate --eval-cache"):
        train(config(world, tmp_path / "run", eval_fraction=0.9999), log=quiet)
    assert not (tmp_path / "run").exists()


def test_a_run_killed_after_its_last_checkpoint_finishes_its_writes(world, tmp_path):
    # Killed between the last checkpoint and summary.json (saving final/ can take minutes for a
    # large student): --resume trains nothing, writes final/ and a summary from the metrics log.
    import shutil

    done = train(config(world, tmp_path / "run", max_steps=4, eval_every=2), log=quiet)
    shutil.rmtree(tmp_path / "run" / "final")
    (tmp_path / "run" / "summary.json").unlink()
    again = train(config(world, tmp_path / "run", max_steps=4, eval_every=2, resume=True), log=quiet)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == again
    assert again["wall_s"] is None and again["steps"] == done["steps"] == 4
    for key in ("train_tokens", "train_loss", "total_steps"):
        assert again[key] == done[key], key
    for key in ("eval_kl", "eval_ppl", "eval_loss"):
        assert again[key] == pytest.approx(done[key], abs=1e-6)
        assert again["eval"][key] == pytest.approx(done["eval"][key], abs=1e-6)
        assert again["initial_eval"][key] == pytest.approx(done["initial_eval"][key], abs=1e-6)
    assert sorted(_losses(tmp_path / "run")) == [1, 2, 3, 4]  # nothing trained again


def test_resume_of_a_run_saved_before_shuffle_tokens_keeps_its_plan(world, tmp_path):
    # A checkpoint written before --shuffle-tokens existed: its config has no such key and its
    # windows were bounded by examples only. Resuming must keep that plan, whatever is passed now.
    kw = dict(max_steps=8, save_every=4, shuffle_buffer=40, shuffle_tokens=None, schedule="constant")
    train(config(world, tmp_path / "whole", **kw), log=quiet)
    train(config(world, tmp_path / "old", **{**kw, "max_steps": 4}), log=quiet)
    state_file = tmp_path / "old" / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=False)
    del state["config"]["shuffle_tokens"]
    torch.save(state, state_file)
    logs = []
    train(config(world, tmp_path / "old", **{**kw, "shuffle_tokens": 1, "resume": True}), log=logs.append)
    assert any("predates shuffle_tokens" in line for line in logs)
    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "old")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[i] for i in range(5, 9)] == pytest.approx([b[i] for i in range(5, 9)], abs=1e-6, rel=0)
    assert json.loads((tmp_path / "old" / "config.json").read_text())["shuffle_tokens"] is None
    # One token per window is a different plan: it gives other batches from step 5 on.
    train(config(world, tmp_path / "other", **{**kw, "shuffle_tokens": 1}), log=quiet)
    assert [a[i] for i in range(5, 9)] != pytest.approx([_losses(tmp_path / "other")[i] for i in range(5, 9)], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# The optional plain language-modelling stream


def test_lm_blocks_pack_tokenized_text_closed_by_eos(world):
    import numpy as np
    from transformers import AutoTokenizer

    from amid.data import DataError, lm_blocks

    data = world["root"] / "data.jsonl"
    tok = AutoTokenizer.from_pretrained(world["student"])
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    want = [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    blocks = lm_blocks(str(data), tok, 16)
    assert blocks.dtype == np.int32 and blocks.shape == (len(want) // 16, 16)
    assert blocks.reshape(-1).tolist() == want[: blocks.size]
    with pytest.raises(DataError, match="--lm-text-field"):
        lm_blocks(str(data), tok, 16, text_field="body")
    with pytest.raises(DataError, match="fewer than one block"):
        lm_blocks(str(data), tok, len(want) + 1)
    # A text that ends in the EOS text is closed once, as in the cache's examples.
    closed = world["root"] / "closed.jsonl"
    closed.write_text("".join(json.dumps({"text": t + tok.eos_token}) + "\n" for t in texts))
    assert lm_blocks(str(closed), tok, 16).tolist() == blocks.tolist()


def test_lm_stream_is_a_function_of_the_index_and_covers_every_block():
    import numpy as np

    from amid.loader import LMStream

    n, length, b = 7, 5, 3
    blocks = np.arange(n * length, dtype=np.int32).reshape(n, length)
    a, fresh = LMStream(blocks, b, seed=4), LMStream(blocks, b, seed=4)
    assert torch.equal(fresh.batch(5)["input_ids"], a.batch(5)["input_ids"])  # no hidden state
    served = torch.cat([a.batch(i)["input_ids"] for i in range(n)])  # 21 blocks: 3 epochs
    which = (served[:, 0] // length).tolist()
    for epoch in range(3):
        assert sorted(which[epoch * n: (epoch + 1) * n]) == list(range(n))
    assert which[:n] != which[n: 2 * n] or which[n: 2 * n] != which[2 * n:], "epochs reshuffle"
    assert which[:n] != (torch.cat([LMStream(blocks, b, seed=5).batch(i)["input_ids"] for i in range(3)])[:n, 0]
                         // length).tolist()
    x = a.batch(2)
    assert x["input_ids"].shape == (b, length) and bool(x["attention_mask"].all())
    assert x["rows"].tolist() == [i * length + t for i in range(b) for t in range(length - 1)]
    assert torch.equal(x["targets"], x["input_ids"][:, 1:].reshape(-1))
    assert torch.equal(x["topk_ids"][:, 0], x["targets"]) and bool(torch.isneginf(x["tail_logmass"]).all())
    assert torch.equal(x["topk_logprobs"], torch.zeros(b * (length - 1), 1))


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_lm_data_adds_its_loss_to_the_objective(world, tmp_path, fused):
    """Step 1 of a run with --lm-weight 1 and of one with 0 start from the same weights and data:
    their losses differ by exactly the LM loss; after that the LM gradient has moved the student."""
    lm = dict(lm_data=str(world["root"] / "data.jsonl"), lm_length=32, lm_batch_size=4, max_steps=12, fused=fused)
    with_lm = train(config(world, tmp_path / "w1", **lm), log=quiet)
    without = train(config(world, tmp_path / "w0", lm_weight=0.0, **lm), log=quiet)
    m1 = [m for m in metrics(tmp_path / "w1") if "loss" in m]
    m0 = [m for m in metrics(tmp_path / "w0") if "loss" in m]
    assert len(m1) == len(m0) == 12 and all("lm_loss" in m for m in m1 + m0)
    assert m1[0]["loss"] - m0[0]["loss"] == pytest.approx(m1[0]["lm_loss"], abs=1e-5)
    assert m1[0]["lm_loss"] == pytest.approx(m0[0]["lm_loss"], abs=1e-6)
    assert m1[-1]["lm_loss"] < m1[0]["lm_loss"] - 0.1, "the LM loss is trained"
    # (Distillation alone lowers it too here: the text was sampled from the teacher.)
    assert m1[-1]["lm_loss"] != pytest.approx(m0[-1]["lm_loss"], abs=1e-4)
    assert with_lm["eval"]["eval_kl"] != pytest.approx(without["eval"]["eval_kl"], abs=1e-6)


def test_lm_data_refusals(world, tmp_path):
    with pytest.raises(TrainError, match="context"):
        train(config(world, tmp_path / "a", lm_data=str(world["root"] / "data.jsonl"), lm_length=4096), log=quiet)
    with pytest.raises(TrainError, match="lm-text-field"):
        train(config(world, tmp_path / "b", lm_data=str(world["root"] / "data.jsonl"), lm_length=32, lm_text_field="body"),
              log=quiet)
    with pytest.raises(ValueError, match="--lm-length"):
        config(world, tmp_path / "c", lm_length=1)


def test_a_run_without_held_out_examples_still_says_it_is_done(world, tmp_path):
    logs: list[str] = []
    summary = train(config(world, tmp_path / "run", max_steps=2, eval_fraction=0.0), log=logs.append)
    assert summary["eval"] is None
    assert any(m.startswith("done: 2 steps, train loss ") and "no held-out evaluation" in m for m in logs), logs


def test_resume_compares_the_loss_as_resolved(world, tmp_path):
    # --preset amid and --alpha 0.5 --lam 0.1 are one objective: either resumes the other; a
    # different α does not.
    kw = dict(save_every=2, preset="amid")
    train(config(world, tmp_path / "run", max_steps=2, **kw), log=quiet)
    train(config(world, tmp_path / "run", max_steps=3, resume=True, alpha=0.5, lam=0.1, **kw), log=quiet)
    with pytest.raises(TrainError, match=r"started with different alpha; resume with the same settings"):
        train(config(world, tmp_path / "run", max_steps=4, resume=True, alpha=0.7, **kw), log=quiet)
    with pytest.raises(TrainError, match=r"started with different divergence, order"):
        train(config(world, tmp_path / "run", max_steps=4, resume=True, divergence="ab", order="rq", **kw), log=quiet)
    train(config(world, tmp_path / "run", max_steps=4, resume=True, **kw), log=quiet)
    assert sorted(_losses(tmp_path / "run")) == [1, 2, 3, 4]


def test_resume_checks_the_lm_data_by_content(world, tmp_path):
    # As the cache: a moved copy of the text resumes, other text under the old name is refused.
    import shutil

    text = tmp_path / "text.jsonl"
    shutil.copy(world["root"] / "data.jsonl", text)
    kw = dict(lm_length=32, lm_batch_size=2, save_every=2)
    train(config(world, tmp_path / "run", lm_data=str(text), max_steps=2, **kw), log=quiet)
    moved = tmp_path / "moved.jsonl"
    shutil.copy(text, moved)
    train(config(world, tmp_path / "run", lm_data=str(moved), max_steps=3, resume=True, **kw), log=quiet)
    text.write_text("".join(reversed(text.read_text().splitlines(keepends=True))))  # same lines, other order
    with pytest.raises(TrainError, match=r"text.jsonl: not the --lm-data this run was trained on") as err:
        train(config(world, tmp_path / "run", lm_data=str(text), max_steps=4, resume=True, **kw), log=quiet)
    assert "\n" not in str(err.value)
    with pytest.raises(TrainError, match="different lm_data"):  # dropping it is a change, not a move
        train(config(world, tmp_path / "run", max_steps=4, resume=True, **kw), log=quiet)
    assert sorted(_losses(tmp_path / "run")) == [1, 2, 3]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(world, tmp_path):
    # A real `amid train` process killed with SIGKILL at an arbitrary point (possibly inside a
    # checkpoint write), then `--resume`d: every step's loss equals an uninterrupted run's.
    import dataclasses
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "amid.cli", "train", "--cache", world["cache"], "--student", world["student"],
            "--out", str(out), "--max-steps", "60", "--lr", "5e-3", "--warmup", "0", "--eval-fraction", "0.2",
            "--log-every", "1", "--save-every", "4", "--eval-every", "1000", "--device", "cpu", "--dtype", "fp32",
            "--quiet"]
    proc = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        steps = [m["step"] for m in metrics(out) if "loss" in m] if (out / "metrics.jsonl").exists() else []
        if steps and steps[-1] >= 20:
            proc.kill()
            killed_at = steps[-1]
            break
        time.sleep(0.01)
    proc.wait()
    if killed_at is None:
        pytest.skip("the run finished (or stalled) before it could be killed")
    cfg = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    train(dataclasses.replace(cfg, resume=True), log=quiet)
    train(dataclasses.replace(cfg, out=str(tmp_path / "whole")), log=quiet)
    a, b = _losses(out), _losses(tmp_path / "whole")
    assert sorted(a) == sorted(b) == list(range(1, 61))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6, rel=0), step


@pytest.fixture
def handlers_put_back():
    """The test leaves SIGINT/SIGTERM as it found them (a stop leaves a handler for late repeats)."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def _signal_at(monkeypatch, step: int, *signums: int) -> None:
    """Send these signals to this process while the trainer is inside step `step` (0-based)."""
    import os

    import amid.train as amid_train

    real = amid_train.learning_rate

    def learning_rate(cfg, at, total):
        if at == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return real(cfg, at, total)

    monkeypatch.setattr(amid_train, "learning_rate", learning_rate)


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_matches(world, tmp_path, monkeypatch, signum,
                                                                           handlers_put_back):
    # Ctrl-C, or a scheduler's SIGTERM: the step in hand finishes, is logged and checkpointed
    # (between two --save-every checkpoints), and --resume continues as if nothing had happened.
    import signal

    from amid.stop import Interrupted

    kw = dict(max_steps=8, save_every=3, eval_every=3)
    train(config(world, tmp_path / "whole", **kw), log=quiet)
    _signal_at(monkeypatch, 4, getattr(signal, signum))
    with pytest.raises(Interrupted, match=rf"{signum} at step 5 of 8: checkpoint saved in .*--resume") as stopped:
        train(config(world, tmp_path / "stopped", **kw), log=quiet)
    assert stopped.value.exit_code == 128 + getattr(signal, signum)
    # handlers put back, behind one that ignores the request's late repeats
    assert getattr(signal.getsignal(signal.SIGINT), "previous", None) is signal.default_int_handler
    assert torch.load(tmp_path / "stopped" / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 5
    assert max(_losses(tmp_path / "stopped")) == 5 and not (tmp_path / "stopped" / "final").exists()
    monkeypatch.undo()
    train(config(world, tmp_path / "stopped", resume=True, **kw), log=quiet)
    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "stopped")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6, rel=0), step


def test_a_stop_at_an_evaluation_step_makes_that_evaluation_up_on_resume(world, tmp_path, monkeypatch,
                                                                         handlers_put_back):
    # The stop skips the evaluation due at its step (the checkpoint comes first); --resume makes
    # it first, so the log holds the evaluations of an uninterrupted run, with the same values.
    import signal

    from amid.stop import Interrupted

    kw = dict(max_steps=8, eval_every=3)
    train(config(world, tmp_path / "whole", **kw), log=quiet)
    _signal_at(monkeypatch, 5, signal.SIGINT)
    with pytest.raises(Interrupted, match="at step 6 of 8"):
        train(config(world, tmp_path / "stopped", **kw), log=quiet)
    assert [m["step"] for m in metrics(tmp_path / "stopped") if "eval_kl" in m] == [0, 3]
    monkeypatch.undo()
    train(config(world, tmp_path / "stopped", resume=True, **kw), log=quiet)
    evals = {run: {m["step"]: m["eval_kl"] for m in metrics(tmp_path / run) if "eval_kl" in m}
             for run in ("whole", "stopped")}
    assert sorted(evals["stopped"]) == sorted(evals["whole"]) == [0, 3, 6, 8]
    assert evals["stopped"] == pytest.approx(evals["whole"], abs=1e-6)
    assert _losses(tmp_path / "stopped") == pytest.approx(_losses(tmp_path / "whole"), abs=1e-6)


def test_an_extended_run_stopped_short_of_its_end_leaves_no_stale_summary_or_final(world, tmp_path, monkeypatch,
                                                                                  handlers_put_back):
    # A finished run of 4 steps, resumed for 8 and stopped at 6: it is not done (no summary.json of
    # the 4 steps), and a resume that asks for 6 steps gives the summary and final/ of step 6.
    import signal

    from safetensors.torch import load_file

    from amid.stop import Interrupted

    out = tmp_path / "run"
    assert train(config(world, out, max_steps=4), log=quiet)["steps"] == 4
    _signal_at(monkeypatch, 5, signal.SIGINT)
    with pytest.raises(Interrupted, match="at step 6 of 8"):
        train(config(world, out, max_steps=8, resume=True), log=quiet)
    monkeypatch.undo()
    assert not (out / "summary.json").exists() and (out / "final" / "model.safetensors").exists()
    done = train(config(world, out, max_steps=6, resume=True), log=quiet)
    assert done["steps"] == 6 == json.loads((out / "summary.json").read_text())["steps"]
    final, ckpt = load_file(out / "final" / "model.safetensors"), load_file(out / "checkpoint" / "model.safetensors")
    assert final.keys() == ckpt.keys() and all(torch.equal(final[k], ckpt[k]) for k in final)
    assert train(config(world, out, max_steps=6, resume=True), log=quiet) == done  # and again: nothing to do


def test_a_checkpoint_holds_the_generator_of_its_own_gpu_only(monkeypatch):
    # A run saved on 8 GPUs may resume on 4, or with each rank's GPU under another index: each
    # rank saves and restores the generator of the device it trains on (CUDA calls stubbed).
    import amid.train as amid_train

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: f"state of {device}")
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state, device)))
    gpu = torch.device("cuda", 3)
    state = amid_train._rng_state(gpu)
    assert state["cuda"] == "state of cuda:3"
    amid_train._set_rng_state(state, torch.device("cuda", 0))
    assert calls == [("state of cuda:3", torch.device("cuda", 0))]
    calls.clear()
    old = {**state, "cuda": [f"old {i}" for i in range(8)]}  # amid <= 0.5.0: every visible GPU's
    amid_train._set_rng_state(old, gpu)
    amid_train._set_rng_state(old, torch.device("cuda", 9))  # more GPUs than the run saw: not restored
    assert calls == [("old 3", gpu)]
    assert amid_train._rng_state(torch.device("cpu"))["cuda"] is None


def test_a_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(world, tmp_path, monkeypatch, handlers_put_back):
    import signal

    import amid.stop
    from amid.stop import Interrupted

    monkeypatch.setattr(amid.stop, "STOP_WINDOW_S", 0.0)
    _signal_at(monkeypatch, 4, signal.SIGINT, signal.SIGINT)
    out = tmp_path / "run"
    with pytest.raises(Interrupted, match=r"stopped at once at step 4 of 8: the checkpoint of step 3 in .* is kept"):
        train(config(world, out, max_steps=8, save_every=3), log=quiet)
    assert torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 3
    monkeypatch.undo()
    done = train(config(world, out, max_steps=8, save_every=3, resume=True), log=quiet)
    assert done["steps"] == 8 and sorted(_losses(out)) == list(range(1, 9))


@pytest.mark.slow
def test_ctrl_c_on_the_command_line_saves_and_says_how_to_continue(world, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "amid.cli", "train", "--cache", world["cache"], "--student", world["student"],
            "--out", str(out), "--max-steps", "100000", "--lr", "1e-3", "--warmup", "0", "--eval-fraction", "0.2",
            "--log-every", "1", "--save-every", "100000", "--eval-every", "100000", "--device", "cpu"]
    proc = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if (out / "metrics.jsonl").exists() and any("loss" in m for m in metrics(out)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "stopping after this step, with a checkpoint" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("Stopped: SIGINT at step ") and last.endswith("continue with the same command and --resume")
    step = int(last.split("at step ")[1].split()[0])
    assert torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == step
    assert max(_losses(out)) == step


def test_nan_loss_stops_and_keeps_last_checkpoint(world, tmp_path, monkeypatch):
    import amid.train as amid_train

    real = amid_train.sparse_loss
    calls = {"train": 0}

    def nan_on_fifth_training_batch(logits, *args, **kw):
        out = real(logits, *args, **kw)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] == 5:
                return out * float("nan")
        return out

    monkeypatch.setattr(amid_train, "sparse_loss", nan_on_fifth_training_batch)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5.*checkpoint.*\(step 4\)"):
        train(config(world, out, max_steps=10, save_every=2), log=quiet)
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 4
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # What the message advises (a lower --lr or a --clip, then --resume) is accepted.
    monkeypatch.setattr(amid_train, "sparse_loss", real)
    done = train(config(world, out, max_steps=10, save_every=2, lr=1e-3, clip=0.5, resume=True), log=quiet)
    assert done["steps"] == 10 and sorted(_losses(out)) == list(range(1, 11))


# ----------------------------------------------------------------------------------------------
# Compatibility


def test_tokenizer_mismatch_is_refused(world, tmp_path):
    other = tmp_path / "other"
    tok = make_tokenizer(other, words=list(reversed(WORDS)))
    make_llama(other, len(tok), seed=4)
    with pytest.raises(TrainError, match=r"different tokenizer.*teacher"):
        train(config(world, tmp_path / "run", student=str(other)), log=quiet)
    assert not (tmp_path / "run").exists()  # a refused run leaves nothing behind


def test_smaller_student_vocabulary_is_refused(world, tmp_path):
    small = tmp_path / "small"
    make_tokenizer(small)
    make_gpt2(small, world["vocab"] - 1, seed=5)
    with pytest.raises(TrainError, match="fewer than the teacher"):
        train(config(world, tmp_path / "run", student=str(small)), log=quiet)


def _padded_teacher(world, directory: Path, rows: int, scale: float) -> Path:
    """The world's teacher with its head padded by `rows` rows beyond the tokenizer (Qwen2.5-7B's
    kind), each `scale` times the sum of the real rows (0: logits 0, never in a top-k)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(world["teacher"])
    v = world["vocab"]
    model.resize_token_embeddings(v + rows, mean_resizing=False)
    with torch.no_grad():
        model.lm_head.weight[v:] = scale * model.lm_head.weight[:v].sum(0)
    model.save_pretrained(directory)
    make_tokenizer(directory)
    return directory


def test_a_teacher_head_padded_beyond_the_tokenizer_trains_a_student_that_covers_the_cached_ids(world, tmp_path):
    teacher = _padded_teacher(world, tmp_path / "padded", 8, 0.0)
    cache = tmp_path / "cache"
    cache_teacher(CacheConfig(teacher=str(teacher), data=str(world["root"] / "data.jsonl"), out=str(cache), top_k=8,
                              max_length=64, examples_per_shard=16, device="cpu"), progress=False, log=quiet)
    assert open_cache(cache).manifest["vocab_size"] == world["vocab"] + 8
    logs: list[str] = []
    done = train(config(world, tmp_path / "run", cache=str(cache), max_steps=2), log=logs.append)  # V logits: fewer
    assert done["steps"] == 2 and any("its head is padded beyond the tokenizer" in m for m in logs), logs
    online = train(config(world, tmp_path / "online", cache=str(cache), max_steps=2, online_teacher=str(teacher)),
                   log=quiet)  # the full-vocabulary path too: the teacher's padding rows are cut off
    assert math.isfinite(online["train_loss"]) and math.isfinite(online["eval_kl"])
    # Padding rows that a top-k holds are tokens this student cannot produce: refused, naming one.
    loud = _padded_teacher(world, tmp_path / "loud", 8, 1.0)
    cache_teacher(CacheConfig(teacher=str(loud), data=str(world["root"] / "data.jsonl"), out=str(tmp_path / "c2"),
                              top_k=8, max_length=64, examples_per_shard=16, device="cpu"), progress=False, log=quiet)
    with pytest.raises(TrainError, match=r"fewer than the teacher's .* holds top-k id \d+, beyond them"):
        train(config(world, tmp_path / "run2", cache=str(tmp_path / "c2"), max_steps=2), log=quiet)
    assert not (tmp_path / "run2").exists()


def test_damaged_shard_is_named(world, tmp_path):
    import shutil

    from amid.cache import CacheError

    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    shard = sorted((cache / "topk").glob("shard-*.parquet"))[2]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the top-k data: readable, checksum wrong
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"topk/{shard.name}"):
        train(config(world, tmp_path / "run", cache=str(cache), max_steps=30), log=quiet)


def test_cli_train_and_one_line_errors(world, tmp_path):
    from click.testing import CliRunner

    from amid.cli import main

    runner = CliRunner()
    assert "--alpha" in runner.invoke(main, ["train", "--help"]).output
    out = tmp_path / "run"
    args = ["train", "--cache", world["cache"], "--student", world["student"], "--out", str(out),
            "--max-steps", "2", "--device", "cpu", "--dtype", "fp32", "--lr", "1e-3", "--quiet"]
    result = runner.invoke(main, args + ["--preset", "skl", "--alpha", "0.5", "--lam", "0.3"])
    assert result.exit_code == 0, result.output
    loss = TrainConfig.from_dict(json.loads((out / "config.json").read_text())).loss
    assert (loss.name, loss.alpha, loss.lam, loss.order) == ("skl", 0.5, 0.3, "pr")
    for bad, message in [
        (["--out", str(out)], "--resume"),  # run directory in use
        (["--cache", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")], "not an amid cache"),
        (["--out", str(tmp_path / "r3"), "--divergence", "nope"], "unknown divergence"),
        (["--out", str(tmp_path / "r4"), "--lam", "2"], "lam must be in [0, 1]"),
    ]:
        result = runner.invoke(main, args + bad)
        assert result.exit_code != 0
        assert "Traceback" not in result.output
        assert result.output.startswith("Error: ") and message in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


# ----------------------------------------------------------------------------------------------
# Loader


def test_plan_covers_each_training_example_once_per_epoch(world):
    cache = open_cache(world["cache"])
    metas = scan(cache)
    train_rows, eval_rows = split(metas, 0.2, 1000)
    for t, e in zip(train_rows, eval_rows):
        assert not set(t.tolist()) & set(e.tolist())
    n_train = sum(len(r) for r in train_rows)
    assert n_train + sum(len(r) for r in eval_rows) == len(cache) and 0 < n_train < len(cache)
    plan = Plan(metas, train_rows, seed=7, batch_size=5, max_tokens=None, shuffle_buffer=20)
    for epoch in (0, 1):
        served = [item for _, batches in plan.epoch(epoch) for b in batches for item in b]
        assert len(served) == len(set(served)) == n_train
    assert plan.epoch(0) != plan.epoch(1)
    assert Plan(metas, train_rows, 7, 5, None, 20).epoch(0) == plan.epoch(0)
    by_tokens = Plan(metas, train_rows, seed=7, batch_size=1, max_tokens=120, shuffle_buffer=20)
    for _, batches in by_tokens.epoch(0):
        for b in batches:
            longest = max(metas[s].lengths[r] for s, r in b)
            assert len(b) == 1 or longest * len(b) <= 120


def test_plan_windows_bounded_by_tokens(world):
    cache = open_cache(world["cache"])
    metas = scan(cache)
    train_rows, _ = split(metas, 0.2, 1000)
    n_train = sum(len(r) for r in train_rows)
    shard_tokens = [int(m.lengths[r].sum()) for m, r in zip(metas, train_rows)]
    cap = max(shard_tokens) + 1  # more than any one shard: windows of one or more whole shards
    by_examples = Plan(metas, train_rows, seed=7, batch_size=5, max_tokens=None, shuffle_buffer=10**6)
    plan = Plan(metas, train_rows, seed=7, batch_size=5, max_tokens=None, shuffle_buffer=10**6, window_tokens=cap)
    assert len(by_examples.epoch(0)) == 1 < len(plan.epoch(0))
    for shards, _ in plan.epoch(0)[:-1]:
        tokens = [shard_tokens[s] for s in shards]
        assert sum(tokens) >= cap > sum(tokens[:-1])  # closed at the shard that reached the cap
    served = [item for _, batches in plan.epoch(0) for b in batches for item in b]
    assert len(served) == len(set(served)) == n_train


def test_loader_resumes_mid_stream(world):
    cache = open_cache(world["cache"])
    metas = scan(cache)
    train_rows, _ = split(metas, 0.2, 1000)
    plan = Plan(metas, train_rows, seed=3, batch_size=4, max_tokens=None, shuffle_buffer=20)
    with Loader(cache, plan, pad_id=1, epochs=2) as loader:
        full = list(loader)
    assert len(full) == 2 * plan.batches_per_epoch
    cut = 7
    with Loader(cache, plan, pad_id=1, start=full[cut - 1][1], epochs=2) as loader:
        rest = list(loader)
    assert len(rest) == len(full) - cut
    for (a, pa), (b, pb) in zip(full[cut:], rest):
        assert pa == pb and torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["topk_ids"], b["topk_ids"])
    last = full[-1][1]
    assert last == Position(2, 0, 0)
    batch = full[0][0]
    # Every target row predicts the next token of its sequence, never a pad.
    assert torch.all(batch["attention_mask"].view(-1)[batch["rows"] + 1] == 1)


# ----------------------------------------------------------------------------------------------
# A real pretrained teacher (../shared/models/stories260K), when present


@pytest.mark.slow
def test_distills_real_stories260k_teacher(tmp_path):
    teacher = SHARED / "models" / "stories260K"
    text = SHARED / "data" / "text" / "tinystories_sample.txt"
    if not teacher.exists() or not text.exists():
        pytest.skip(f"{SHARED} (stories260K and TinyStories sample) not present")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    tok.save_pretrained(tmp_path / "student")
    make_llama(tmp_path / "student", len(tok), seed=0, hidden=32)
    stories = [s.strip() for s in text.read_text().split("<|endoftext|>") if s.strip()]
    lines = [line for s in stories for line in s.splitlines() if len(line.split()) > 4]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    cache_teacher(CacheConfig(teacher=str(teacher), data=str(data), out=str(tmp_path / "cache"), top_k=32, limit=80,
                              max_length=64, overflow="truncate", device="cpu"), progress=False, log=quiet)
    cfg = TrainConfig(cache=str(tmp_path / "cache"), student=str(tmp_path / "student"), out=str(tmp_path / "run"),
                      lr=3e-3, max_steps=25, batch_size=8, warmup_steps=0,
                      eval_fraction=0.15, device="cpu", dtype="fp32", progress=False)
    summary = train(cfg, log=quiet)
    assert summary["eval"]["eval_kl"] < 0.8 * summary["initial_eval"]["eval_kl"]
    assert summary["eval"]["eval_ppl"] < summary["initial_eval"]["eval_ppl"]


@pytest.mark.slow
def test_cache_gap_recipe(world, tmp_path, capsys, monkeypatch):
    # pipelines.cache_gap on the tiny world: a cache and a run per k, an online run, one table
    # whose rows are the runs' own full-vocabulary evaluations; a run killed mid-way resumes.
    import amid.train as amid_train
    from pipelines.cache_gap import main

    out = tmp_path / "gap"
    args = ["--teacher", world["teacher"], "--random-student", "32x1", "--data", str(world["root"] / "data.jsonl"),
            "--k", "4,8", "--steps", "3", "--max-length", "64", "--device", "cpu", "--out", str(out)]
    with pytest.raises(SystemExit):
        main([*args, "--k", "0,4"])  # refused by the parser, before anything is written
    with pytest.raises(SystemExit):
        main([*args, "--random-student", "64"])
    assert not out.exists()

    real = amid_train.learning_rate

    def killed_in_the_online_run(cfg, step, total):
        if cfg.online_teacher and step == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(cfg, step, total)

    monkeypatch.setattr(amid_train, "learning_rate", killed_in_the_online_run)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr(amid_train, "learning_rate", real)
    capsys.readouterr()
    main(args)  # finishes the online run from its checkpoint-less start, reusing the rest
    table = (out / "cache_gap.md").read_text()
    assert table.strip() in capsys.readouterr().out
    runs = json.loads((out / "cache_gap.json").read_text())["runs"]
    assert list(runs) == ["cache, k = 4", "cache, k = 8", "online teacher, full vocabulary"]
    online = runs["online teacher, full vocabulary"]["eval_kl_full"]
    for name, summary in runs.items():
        assert summary["steps"] == 3
        gap = "" if name.startswith("online") else f" ({summary['eval_kl_full'] - online:+.4f} vs online)"
        assert f"| {summary['eval_kl_full']:.4f}{gap} |" in table
    initial = [m for m in metrics(out / "run_k4") if m["step"] == 0][0]["eval_kl_full"]
    assert f"| (initial student) | | {initial:.4f} |" in table and online < initial
    tails = [json.loads((out / f"cache_k{k}" / "manifest.json").read_text())["counts"]["mean_tail_mass"] for k in (4, 8)]
    assert tails[0] > tails[1] > 0
    main(args)
    assert (out / "cache_gap.md").read_text() == table  # a second run reuses every cache and run
    with pytest.raises(SystemExit, match="other lr, steps"):
        main([*args, "--steps", "5", "--lr", "1e-3"])


def test_amid_eval_end_to_end_reports_what_it_measured(world, tmp_path):
    from click.testing import CliRunner

    from amid.cli import main

    words = WORDS[:12]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": " ".join(words[i:i + 3]), "response": " ".join(words[i + 3:i + 6])})
                            + "\n" for i in range(6)) + json.dumps({"prompt": "the cat", "response": ""}) + "\n")
    run = tmp_path / "run"
    train(config(world, run, max_steps=2), log=quiet)
    out = tmp_path / "eval"
    res = CliRunner().invoke(main, ["eval", "--model", str(run), "--data", str(data), "--out", str(out), "--rouge",
                                    "--seeds", "1", "--max-new-tokens", "4", "--max-length", "100000"])
    assert res.exit_code == 0, res.output
    got = json.loads((out / "eval.json").read_text())
    assert got["model_dir"] == str(run / "final") and got["examples"] == 6 and got["skipped_no_target"] == 1
    assert got["max_length"] == 128  # capped at the student's context
    assert got["template"] == "plain"  # what "auto" chose for prompt/response records
    assert got["tokens"] == 6 * 4 and got["ppl"] > 1 and 0 <= got["rougeL"] <= 100
    assert got["rouge_examples"] == 6 and got["rouge_skipped_no_reference"] == 1  # the empty response is not scored
    assert len((out / "generations.jsonl").read_text().splitlines()) == 6
    res = CliRunner().invoke(main, ["eval", "--model", str(run), "--data", str(data), "--out", str(out)])
    assert res.exit_code == 0 and not (out / "generations.jsonl").exists()  # no stale generations beside it


def test_amid_eval_generation_fits_a_short_context(world, tmp_path):
    # A 16-position student, prompts longer than half of it: the prompt keeps its end, the
    # generation fits, nothing indexes past the positions.
    from transformers import GPT2Config, GPT2LMHeadModel

    from amid.evaluate import EvalConfig, evaluate

    short = tmp_path / "short"
    make_tokenizer(short)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=world["vocab"], n_embd=16, n_layer=1, n_head=2, n_positions=16,
                               bos_token_id=2, eos_token_id=3)).save_pretrained(short)
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": " ".join(WORDS[:12]), "response": "the cat runs"}) + "\n")
    got = evaluate(EvalConfig(model=str(short), data=str(data), rouge=True, seeds=(1,), max_new_tokens=10))
    assert got["max_length"] == 16 and got["rouge_prompts_cut"] == 1 and 0 <= got["rougeL"] <= 100


def test_an_alpha_that_cannot_matter_is_noted(world, tmp_path):
    logs: list[str] = []
    train(config(world, tmp_path / "kd", preset="kd", alpha=0.5, max_steps=1), log=logs.append)
    assert any("note: --alpha 0.5 has no effect here: with λ = 0 (preset kd) the mixture is the student" in m
               for m in logs), logs
    logs.clear()
    train(config(world, tmp_path / "amid", preset="amid", alpha=0.5, max_steps=1), log=logs.append)
    assert not any("has no effect" in m for m in logs)
    train(config(world, tmp_path / "ce", preset="ce", alpha=0.3, lam=0.5, max_steps=1), log=logs.append)
    assert any("note: --alpha, --lam have no effect here: with --ce-weight 1 (preset ce) the loss is plain "
               "cross-entropy" in m for m in logs), logs
    assert not any("pass --lam between 0 and 1" in m for m in logs)


def test_a_fresh_run_that_loses_the_race_for_a_new_directory_writes_nothing(world, tmp_path, monkeypatch):
    # --out did not exist when this run looked; another amid train made it, wrote its metrics and
    # finished (its lock released) while this one loaded the cache and the student.
    import amid.train as amid_train

    out = tmp_path / "run"
    real = amid_train.open_cache

    def other_run_meanwhile(*args, **kwargs):
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"cache": "c", "student": "s", "out": str(out)}))
        (out / "metrics.jsonl").write_text('{"step": 0, "eval_kl": 1.0}\n')
        (out / "summary.json").write_text('{"steps": 99}')
        return real(*args, **kwargs)

    monkeypatch.setattr(amid_train, "open_cache", other_run_meanwhile)
    with pytest.raises(TrainError, match="another amid train started in this directory"):
        train(config(world, out), log=quiet)
    assert (out / "metrics.jsonl").read_text() == '{"step": 0, "eval_kl": 1.0}\n'
    assert json.loads((out / "summary.json").read_text()) == {"steps": 99}


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_previous(world, tmp_path, monkeypatch):
    # A full disk: torch.save fails with "unexpected pos" (a RuntimeError) midway through the write.
    import amid.train as amid_train

    out = tmp_path / "run"
    train(config(world, out, max_steps=4, save_every=2), log=quiet)  # a finished run with a checkpoint at 4
    real = amid_train.torch.save

    def full_disk(obj, f, *args, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5504 vs 5392")

    monkeypatch.setattr(amid_train.torch, "save", full_disk)
    with pytest.raises(TrainError, match=r"checkpoint: writing it failed \(\[enforce fail.*is the disk full\?\); "
                                         r"the previous checkpoint is kept; free space and continue .* --resume"):
        train(config(world, out, max_steps=8, save_every=2, resume=True), log=quiet)
    monkeypatch.setattr(amid_train.torch, "save", real)
    assert not (out / ".checkpoint.tmp").exists()
    assert torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 4
    done = train(config(world, out, max_steps=8, save_every=2, resume=True), log=quiet)
    assert done["steps"] == 8


def test_resuming_with_another_student_says_the_checkpoint_is_used(world, tmp_path):
    out = tmp_path / "run"
    train(config(world, out, max_steps=2, save_every=1), log=quiet)
    other = tmp_path / "other"
    make_tokenizer(other)
    make_llama(other, world["vocab"], seed=5)
    logs: list[str] = []
    train(config(world, out, max_steps=3, student=str(other), resume=True), log=logs.append)
    assert any(f"note: --student {other} is not the student this run started from" in m for m in logs), logs


def test_a_run_whose_config_json_is_damaged_resumes_from_its_checkpoint(world, tmp_path):
    out = tmp_path / "run"
    train(config(world, out, max_steps=2, save_every=1), log=quiet)
    (out / "config.json").write_text('{"cache": "trunc')  # cut short by a crash or an editor
    done = train(config(world, out, max_steps=3, resume=True), log=quiet)
    assert done["steps"] == 3 and json.loads((out / "config.json").read_text())["max_steps"] == 3
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("not json")  # no run files: still not taken for a run
    with pytest.raises(TrainError, match="not an amid run"):
        train(config(world, model_dir, max_steps=1), log=quiet)


def test_a_fresh_run_in_a_directory_of_other_files_is_refused_writing_nothing(world, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("{}\n")
    with pytest.raises(TrainError, match=r"data: holds other files \(train.jsonl\).*choose an empty or new --out"):
        train(config(world, data, max_steps=1), log=quiet)
    assert sorted(f.name for f in data.iterdir()) == ["train.jsonl"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_text("")  # hidden files are no one's run
    assert train(config(world, empty, max_steps=1), log=quiet)["steps"] == 1

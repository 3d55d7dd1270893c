"""amid.models: every command loads its models through one place, which refuses in one line what
transformers would load anyway (a missing LM head filled with random values) or fail deep inside."""

from __future__ import annotations

import math
import os

import pytest
import torch
from click.testing import CliRunner

from amid.cli import main
from amid.models import ModelError, load_model, load_tokenizer
from helpers import train_tokenizer, write_jsonl

transformers = pytest.importorskip("transformers")


def _llama_config(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A good causal LM, a bare base model (no LM head), one with a truncated weight file and a
    tokenizer-only directory, all with the same tokenizer; and a small data file."""
    from transformers import LlamaForCausalLM, LlamaModel

    root = tmp_path_factory.mktemp("models")
    tok = train_tokenizer(300)
    torch.manual_seed(0)
    for name, cls in (("good", LlamaForCausalLM), ("headless", LlamaModel), ("cut", LlamaForCausalLM)):
        cls(_llama_config(len(tok))).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    weights = root / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    tok.save_pretrained(root / "tokenizer_only")
    LlamaForCausalLM(_llama_config(len(tok))).save_pretrained(root / "no_tokenizer")
    data = write_jsonl(root / "data.jsonl", [{"prompt": f"Count {i}:", "response": " one two three"} for i in range(6)])
    return {"root": root, "data": str(data)}


def test_a_model_without_its_lm_head_is_refused_not_filled_with_random_weights(models):
    root = models["root"]
    assert load_model(str(root / "good"), "--teacher") is not None
    with pytest.raises(ModelError, match=r"--teacher .*headless: its weights lack lm_head.weight \(a base model"):
        load_model(str(root / "headless"), "--teacher")


@pytest.mark.parametrize("name,needle", [
    ("cut", "cannot be loaded as a causal language model"),
    ("tokenizer_only", "tokenizer_only: no config.json; not a saved transformers model"),
])
def test_a_damaged_or_incomplete_model_directory_is_one_line(models, name, needle):
    with pytest.raises(ModelError, match=needle):
        load_model(str(models["root"] / name), "--student")


def test_a_directory_without_a_tokenizer_is_named(models):
    with pytest.raises(ModelError, match=r"--student .*no_tokenizer: no tokenizer files \(tokenizer.json, "
                                         r"tokenizer_config.json, ...\); save the tokenizer beside the model"):
        load_tokenizer(str(models["root"] / "no_tokenizer"), "--student")


def test_a_run_directory_serves_as_its_model_and_other_paths_are_named(models, tmp_path, monkeypatch):
    import shutil

    from amid.models import check_model_name, resolve_model

    root = models["root"]
    run = tmp_path / "runs" / "a"
    (run / "final").mkdir(parents=True)
    (run / "config.json").write_text('{"loss": {"alpha": 0.5}, "dtype": "auto"}')  # amid's, not a model config
    for f in (root / "good").iterdir():
        shutil.copy(f, run / "final" / f.name)
    assert resolve_model(str(run)) == str(run / "final") and resolve_model("gpt2") == "gpt2"
    assert load_tokenizer(str(run), "--student") is not None and load_model(str(run), "--student") is not None
    from amid.models import model_context  # the config read alone (sweep's --eval-data check, hints)

    assert model_context(str(run)) == model_context(str(root / "good")) is not None
    shutil.move(str(run / "final"), str(run / "checkpoint"))  # a run stopped before its end
    assert resolve_model(str(run)) == str(run / "checkpoint")

    cache = tmp_path / "cache"
    (cache / "examples").mkdir(parents=True)
    (cache / "manifest.json").write_text("{}")
    with pytest.raises(ModelError, match=r"--student .*cache: an amid cache, not a model \(a cache goes to --cache\)"):
        load_tokenizer(str(cache), "--student")

    monkeypatch.chdir(tmp_path)  # "runs/" exists here: runs/typo is a local path, not a hub name
    with pytest.raises(ModelError, match=r"--model runs/typo: no such local model directory \(runs/ exists here"):
        check_model_name("runs/typo", "--model")
    with pytest.raises(ModelError, match=r"--model s3/runs/x: no such local model directory$"):
        check_model_name("s3/runs/x", "--model")  # two slashes: no hub name
    with pytest.raises(ModelError, match=r"--teacher runs/a/config.json: a file, not a model directory"):
        check_model_name("runs/a/config.json", "--teacher")
    check_model_name("owner/name", "--teacher")  # may be a hub name: transformers' to judge
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name, **kw: f"asked for {name}")
    assert load_tokenizer("owner/name", "--teacher") == "asked for owner/name"  # handed on as it is
    assert load_tokenizer(str(run), "--teacher") == f"asked for {run / 'checkpoint'}"
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    # A folder of downloaded models ("Qwen/" holding Qwen/Qwen2-1.5B): a sibling name may be on the hub.
    shutil.copytree(root / "good", tmp_path / "Qwen" / "Qwen2-1.5B")
    check_model_name("Qwen/Qwen2-0.5B", "--student")
    (tmp_path / "gpt2").write_text("not a model")  # a file named like a hub model: the hub's name still
    check_model_name("gpt2", "--student")

    # A run killed before its first checkpoint has nothing to load; a run resumed past its end has a
    # newer checkpoint/ than its final/, and that is the model it holds now.
    killed = tmp_path / "runs" / "killed"
    killed.mkdir()
    (killed / "config.json").write_text('{"cache": "c"}')
    (killed / "metrics.jsonl").write_text("")
    for load in (load_tokenizer, load_model):
        with pytest.raises(ModelError, match=r"runs/killed: an amid run directory with no final/ or checkpoint/ yet"):
            load(str(killed), "--model")
    for sub in ("final", "checkpoint"):
        shutil.copytree(root / "good", run / sub, dirs_exist_ok=True)
    os.utime(run / "final" / "model.safetensors", (1, 1))
    assert resolve_model(str(run)) == str(run / "checkpoint")
    os.utime(run / "checkpoint" / "model.safetensors", (0, 0))
    assert resolve_model(str(run)) == str(run / "final")


def test_every_command_refuses_them_in_one_line_and_writes_nothing(models, tmp_path):
    root, data = models["root"], models["data"]
    runner = CliRunner()
    for bad in ("headless", "cut"):
        out = tmp_path / f"cache_{bad}"
        res = runner.invoke(main, ["cache-teacher", "--teacher", str(root / bad), "--data", data, "--out", str(out),
                                   "--top-k", "4", "--device", "cpu", "--quiet"])
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert res.output.strip().splitlines()[-1].startswith(f"Error: --teacher {root / bad}: "), res.output
        assert not out.exists()
        res = runner.invoke(main, ["eval", "--model", str(root / bad), "--data", data, "--device", "cpu"])
        assert res.exit_code == 1 and res.output.strip().splitlines()[-1].startswith(f"Error: --model {root / bad}: ")

    cache = tmp_path / "cache"
    res = runner.invoke(main, ["cache-teacher", "--teacher", str(root / "good"), "--data", data, "--out", str(cache),
                               "--top-k", "4", "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    res = runner.invoke(main, ["train", "--cache", str(cache), "--student", str(root / "headless"), "--out", str(run),
                               "--max-steps", "1", "--device", "cpu", "--quiet"])
    assert res.exit_code == 1 and "its weights lack lm_head.weight" in res.output.strip().splitlines()[-1]
    assert not run.exists()


def test_non_finite_rates_and_temperatures_are_refused_up_front(models, tmp_path):
    from amid.evaluate import EvalConfig
    from amid.teacher import CacheConfig
    from amid.train import TrainConfig

    with pytest.raises(ValueError, match="--lr must be positive and finite, got inf"):
        TrainConfig(cache="c", student="s", out="o", lr=math.inf)
    with pytest.raises(ValueError, match="--seed must be at least 0, got -1"):
        TrainConfig(cache="c", student="s", out="o", seed=-1)
    with pytest.raises(ValueError, match="--temperature must be positive and finite, got inf"):
        CacheConfig(teacher="t", data="d", out="o", temperature=math.inf)
    with pytest.raises(ValueError, match="--seeds must name at least one sampling seed"):
        EvalConfig(model="m", data="d", rouge=True, seeds=())
    res = CliRunner().invoke(main, ["eval", "--model", str(models["root"] / "good"), "--data", models["data"],
                                    "--rouge", "--seeds", ","])
    assert res.exit_code == 1 and "--seeds must name at least one sampling seed" in res.output, res.output

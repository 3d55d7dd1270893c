"""cache-teacher --device-map: which GPUs a process takes, where the layers go, and a teacher
run through accelerate's hooks giving the cache a teacher on one device gives.

No GPU here: the device maps are computed for budgets of made-up GPUs (accelerate plans from the
model's config without touching a device), and the hooked forward runs with every part on the
CPU; a spread over real GPUs is not run by these tests."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate", reason="--device-map needs accelerate (pip install accelerate)")

from amid.cache import open_cache  # noqa: E402
from amid.heads import TargetLogits  # noqa: E402
from amid.models import ModelError  # noqa: E402
from amid.placement import process_gpus, spread_device_map  # noqa: E402
from amid.teacher import CacheConfig, cache_teacher  # noqa: E402
from helpers import instruction_records, make_model, save_teacher, train_tokenizer, write_jsonl  # noqa: E402


def test_each_process_takes_an_equal_contiguous_share_of_the_nodes_gpus():
    assert process_gpus(0) == []  # no GPU: the CPU
    assert process_gpus(8) == list(range(8))
    assert [process_gpus(8, r, 4) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert process_gpus(3, 1, 2) == [1]  # 3 GPUs, 2 processes: one each, one left idle
    with pytest.raises(ValueError, match="4 processes on this node share 2 GPU"):
        process_gpus(2, 0, 4)


def _weights_bytes(model, dtype) -> int:
    return sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 4-layer Llama teacher (untied head) saved to disk, and its size in bf16."""
    tok = train_tokenizer(300, add_bos=True)
    model = make_model("llama", len(tok), tok, num_hidden_layers=4, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    head = model.get_output_embeddings().weight.numel() * 4
    return path, _weights_bytes(model, torch.bfloat16), head


def test_layers_are_balanced_over_the_gpus_with_the_head_on_the_last(llama):
    path, size, head = llama
    device_map = spread_device_map(str(path), "--teacher", False, torch.bfloat16, [0, 1],
                                   budget={0: size, 1: size + head})
    assert set(device_map.values()) == {0, 1} and device_map["lm_head"] == 1
    assert device_map["model.embed_tokens"] == 0
    layers = [device_map[f"model.layers.{i}"] for i in range(4)]
    assert layers == sorted(layers) and 0 < layers.count(0) < 4  # in order, and on both GPUs
    assert spread_device_map(str(path), "--teacher", False, torch.float32, []) == {"": "cpu"}


def test_a_teacher_the_gpus_cannot_hold_is_refused_in_one_line(llama):
    path, size, head = llama
    with pytest.raises(ModelError, match=r"--teacher .*: its weights \(.* MiB in bfloat16\) do not fit in 2 GPU\(s\).*"
                                         r"would run part of it on the disk\. Use more GPUs, or GPUs with more "
                                         r"free memory$"):
        spread_device_map(str(path), "--teacher", False, torch.bfloat16, [0, 1], budget={0: size // 3, 1: size // 3})
    with pytest.raises(ModelError, match=r"Start fewer processes a node \(torchrun --nproc-per-node\), so that each "
                                         r"spreads it over more GPUs, or pass --dtype bf16$"):
        spread_device_map(str(path), "--teacher", False, torch.float32, [0], budget={0: size // 3}, processes=4)
    with pytest.raises(ModelError, match=r"--teacher .*nowhere: "):
        spread_device_map(str(path / "nowhere"), "--teacher", False, torch.bfloat16, [0])


@pytest.mark.filterwarnings("ignore:Current model requires")  # accelerate's offload advice, for budgets that spill
def test_the_lm_heads_float32_copy_is_set_aside_on_its_gpu(llama):
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path, size, head = llama
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)

    def fits_alone(budget: int) -> bool:  # accelerate's own answer, nothing set aside
        return "disk" not in infer_auto_device_map(empty, max_memory={0: budget}, dtype=torch.bfloat16).values()

    low, high = 1, 4 * size  # the least budget accelerate fits the bf16 weights in
    while low < high:
        low, high = (low, (low + high) // 2) if fits_alone((low + high) // 2) else ((low + high) // 2 + 1, high)
    assert fits_alone(low) and not fits_alone(low - 1)
    spread_device_map(str(path), "--teacher", False, torch.bfloat16, [0], budget={0: low + head})
    with pytest.raises(ModelError, match="do not fit in 1 GPU"):
        spread_device_map(str(path), "--teacher", False, torch.bfloat16, [0], budget={0: low + head - 1})
    # A float32 teacher's head is used as it is: nothing to set aside.
    assert spread_device_map(str(path), "--teacher", False, torch.float32, [0], budget={0: 8 * size}) == {"": 0}


def _config_only(path, **kw):
    """A model directory holding only a config: the plan reads no weights."""
    from transformers import LlamaConfig

    LlamaConfig(num_attention_heads=8, num_key_value_heads=8, **kw).save_pretrained(path)
    with __import__("accelerate").init_empty_weights():
        from transformers import AutoModelForCausalLM
        empty = AutoModelForCausalLM.from_config(LlamaConfig.from_pretrained(path), dtype=torch.bfloat16)
    return sum(p.numel() for p in empty.parameters()) * 2, empty.get_output_embeddings().weight.numel() * 4


def test_a_tied_lm_head_is_planned_with_its_embedding(tmp_path):
    # Qwen2.5-3B, Llama 3.2, Gemma: the head is the embedding. Planned apart (the meta model is
    # untied), loading would move the embedding to the head's GPU behind its hook's back.
    size, head = _config_only(tmp_path, hidden_size=256, intermediate_size=512, num_hidden_layers=8, vocab_size=8192,
                              tie_word_embeddings=True)
    device_map = spread_device_map(str(tmp_path), "--teacher", False, torch.bfloat16, [0, 1],
                                   budget={0: size, 1: size})
    assert device_map["lm_head"] == device_map["model.embed_tokens"] == 0 and 1 in device_map.values()


def test_a_teacher_that_fits_only_unbalanced_is_packed_in_order(tmp_path):
    # A large head (V = 151936) and small layers: balancing leaves no GPU room for the head and its
    # float32 copy, filling the GPUs in order does.
    size, head = _config_only(tmp_path, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                              vocab_size=151936, tie_word_embeddings=False)
    per_gpu = int((size + head) * 0.8)
    device_map = spread_device_map(str(tmp_path), "--teacher", False, torch.bfloat16, [0, 1],
                                   budget={0: per_gpu, 1: per_gpu})
    assert set(device_map.values()) <= {0, 1}


def test_target_logits_through_accelerates_hooks_equal_the_plain_models():
    from accelerate import dispatch_model

    tok = train_tokenizer(300, add_bos=True)
    model = make_model("llama", len(tok), tok, num_hidden_layers=4)
    parts = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "cpu",
             "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    hooked = dispatch_model(copy.deepcopy(model), parts, main_device="cpu", force_hooks=True)
    assert hasattr(hooked.model.layers[0], "_hf_hook")  # the forward goes through accelerate
    batch = {"input_ids": torch.randint(0, 300, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long),
             "rows": torch.tensor([0, 3, 8, 10, 17])}
    plain, spread = TargetLogits(model), TargetLogits(hooked)
    assert spread.mode == plain.mode == "float32 head"
    for a, b in zip(plain.chunks(batch, 2), spread.chunks(batch, 2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cache_teacher_with_a_device_map_writes_the_cache_a_plain_run_writes(tmp_path):
    teacher = save_teacher(tmp_path / "teacher", "llama")
    data = write_jsonl(tmp_path / "d.jsonl", instruction_records(6, seed=3))
    lines = []
    kw = dict(teacher=str(teacher), data=str(data), top_k=8, progress=False)
    cache_teacher(CacheConfig(out=str(tmp_path / "plain"), **{k: v for k, v in kw.items() if k != "progress"}),
                  progress=False, log=lambda m: None)
    cache_teacher(CacheConfig(out=str(tmp_path / "spread"), device_map="auto",
                              **{k: v for k, v in kw.items() if k != "progress"}), progress=False, log=lines.append)
    assert any("on cpu (--device-map auto)" in line for line in lines)
    for a, b in zip(open_cache(tmp_path / "plain"), open_cache(tmp_path / "spread"), strict=True):
        for key in ("input_ids", "topk_ids", "topk_logprobs", "tail_logmass"):
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
    with pytest.raises(ValueError, match="--device cpu and --device-map auto: pass one"):
        CacheConfig(teacher="t", data="d", out="o", device="cpu", device_map="auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_session.sh runs it)")
def test_cache_teacher_with_a_device_map_on_a_gpu_equals_one_on_that_gpu(tmp_path):
    teacher = save_teacher(tmp_path / "teacher", "qwen2", tokenizer_vocab=300, model_vocab=320)
    data = write_jsonl(tmp_path / "d.jsonl", instruction_records(6, seed=4))
    kw = dict(teacher=str(teacher), data=str(data), top_k=8)
    cache_teacher(CacheConfig(out=str(tmp_path / "one"), device="cuda:0", **kw), progress=False, log=lambda m: None)
    lines = []
    cache_teacher(CacheConfig(out=str(tmp_path / "map"), device_map="auto", **kw), progress=False, log=lines.append)
    assert any("on cuda:0 (--device-map auto)" in line for line in lines)
    for a, b in zip(open_cache(tmp_path / "one"), open_cache(tmp_path / "map"), strict=True):
        for key in ("topk_ids", "topk_logprobs", "tail_logmass"):
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_without_accelerate_device_map_is_refused_before_the_data_is_read(tmp_path, monkeypatch):
    import sys

    for name in ("accelerate", "accelerate.utils"):  # not installed (imported by the tests above: blocked)
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ModelError, match=r"^--device-map auto needs accelerate: pip install accelerate"):
        cache_teacher(CacheConfig(teacher=str(tmp_path / "t"), data=str(tmp_path / "missing.jsonl"),
                                  out=str(tmp_path / "c"), device_map="auto"), progress=False, log=lambda m: None)
    assert not (tmp_path / "c").exists()

"""How logits at target rows come out of a causal LM (amid.heads), for the student and the teacher."""

from __future__ import annotations

import pytest
import torch

from amid.errors import OUT_OF_MEMORY
from amid.heads import Head, TargetLogits
from helpers import make_model, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(300, add_bos=True)


def _batch(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (3, 17), generator=g)
    mask = torch.ones_like(input_ids)
    mask[1, 12:] = 0  # a right-padded sequence
    rows = torch.tensor([0, 5, 16, 17 + 3, 17 + 11, 34 + 0, 34 + 9, 34 + 16])
    return {"input_ids": input_ids, "attention_mask": mask, "rows": rows}


def _gemma2(tok):
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                       final_logit_softcapping=5.0, initializer_range=0.5)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).float().eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_plain_heads_give_the_models_logits_at_the_rows(arch, tok):
    model = make_model(arch, len(tok), tok)
    head = Head(model)
    assert head.plain and head.linear
    batch = _batch(len(tok))
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = full.reshape(-1, full.shape[-1])[batch["rows"]]
        assert torch.allclose(head.logits(batch), want, rtol=1e-5, atol=1e-5)


def test_soft_capped_head_is_not_split(tok):
    model = _gemma2(tok)
    head, target = Head(model), TargetLogits(model)
    assert not head.plain and target.mode == "model"
    batch = _batch(len(tok))
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = full.reshape(-1, full.shape[-1])[batch["rows"]]
    assert float(want.abs().max()) <= 5.0  # the cap is in force, and the route reproduces it
    assert torch.allclose(torch.cat(list(target.chunks(batch, 3))), want, rtol=1e-6, atol=1e-6)


def test_running_out_of_memory_in_the_head_check_is_raised_not_taken_for_a_transformed_head(tok):
    # Taken for "not plain", an OOM would silently switch a teacher to its own (bf16) logits.
    model = make_model("llama", len(tok), tok)

    def oom(*_args, **_kwargs):
        raise OUT_OF_MEMORY("CUDA out of memory (simulated)")

    model.lm_head.forward = oom
    with pytest.raises(OUT_OF_MEMORY):
        Head(model)
    model.lm_head.forward = lambda *_a, **_k: (_ for _ in ()).throw(RuntimeError("not a head that splits"))
    assert not Head(model).plain


def test_teacher_head_is_float32_for_a_bf16_model_even_under_autocast(tok):
    """The float32 LM head: exact dot products of the bf16 hidden states and bf16 weights (what a
    float64 reference computes from the same hidden states), whatever autocast says, in any chunking."""
    model = make_model("llama", len(tok), tok).to(torch.bfloat16)
    target = TargetLogits(model)
    assert target.mode == "float32 head" and target.weight.dtype == torch.float32
    batch = _batch(len(tok), seed=1)
    with torch.no_grad():
        hidden = Head(model).hidden(batch)
        ref = hidden.double() @ model.get_output_embeddings().weight.double().T
        bf16 = model.get_output_embeddings()(hidden).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for step in (1, 3, 100):
            z = torch.cat(list(target.chunks(batch, step)))
            assert z.dtype == torch.float32
            assert torch.allclose(z.double(), ref, rtol=1e-6, atol=1e-6), step
    # What it avoids: the bf16 head's logits are off by far more than float32 rounding.
    assert float((bf16 - ref).abs().max()) > 1e-3

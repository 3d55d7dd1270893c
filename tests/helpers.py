"""Shared test utilities: tiny models and tokenizers built offline, and the optional ../shared files.

Nothing here downloads anything. Tiny tokenizers are trained with the `tokenizers` library on a
built-in corpus and saved as a `PreTrainedTokenizerFast`; tiny GPT-2 / Llama / Qwen2 models are
built from transformers configs with random weights (seeded) and saved next to the tokenizer, so
`AutoTokenizer.from_pretrained(dir)` and `AutoModelForCausalLM.from_pretrained(dir)` both work.

`../shared` (real tokenizers, data, a pretrained model) is optional: use `shared_path(...)`, which
skips the calling test with a reason when the file is absent.

Keep this module additive: several test files import from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"

# A small built-in corpus: enough for a byte-level BPE with a few hundred merges.
CORPUS = [
    "Once upon a time there was a little boy named Ben. Ben loved to explore the world around him.",
    "He saw many amazing things, like beautiful vases that were on display in a store.",
    "The shopkeeper smiled and said, Of course you can. You can take it home and show your friends!",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nName three primary colours.\n\n### Response:\nRed, yellow and blue.",
    "### Input:\nThe Watergate scandal was a major political scandal in the United States.",
    "What is the capital of France? The capital of France is Paris, a city on the Seine.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in plants.",
    "Count from one to ten: one, two, three, four, five, six, seven, eight, nine, ten.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "Numbers 0123456789 and symbols !?.,;:'\"()[]{}<>-_=+*/\\|@#$%^&~` appear in text too.",
]

EOS = "<|endoftext|>"
PAD = "<pad>"
BOS = "<s>"

# A minimal ChatML-style template (what Qwen2 uses), for tiny tokenizers that need one.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ChatML that, like Qwen3's template, opens the last assistant turn with an empty <think> block
# (unless its content brings one), and puts that block in the generation prompt when called with
# enable_thinking=False.
NO_THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last "
    "and '</think>' not in m['content'] %}<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

# ChatML that, like Qwen3's template, drops the <think> block of every assistant turn before the
# last user turn: a conversation's earlier turns render differently once more turns follow.
THINKING_TEMPLATE = (
    "{% set ns = namespace(last_user=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in c %}"
    "{% set c = c.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ c }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------------------------
# ../shared


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the calling test when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (../shared is optional; tests that need it skip)")
    return path


def has_shared(*parts: str) -> bool:
    return SHARED.joinpath(*parts).exists()


def requires_shared(*parts: str):
    """Decorator form: `@requires_shared("tokenizers", "gpt2")`."""
    path = SHARED.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not available (../shared is optional)")


# ----------------------------------------------------------------------------------------------
# Tokenizers


def train_tokenizer(
    vocab_size: int = 300,
    corpus: Iterable[str] | None = None,
    add_bos: bool = False,
    chat_template: str | None = None,
):
    """A byte-level BPE `PreTrainedTokenizerFast` of exactly `vocab_size` tokens (specials included).

    Specials: `<|endoftext|>` (eos; also bos unless `add_bos`), `<pad>` (pad), and with
    `add_bos` a separate `<s>` that a post-processor prepends to every encoding, like Llama.
    With `chat_template`, the ChatML markers `<|im_start|>`/`<|im_end|>` are added as specials.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS, PAD] + ([BOS] if add_bos else []) + (["<|im_start|>", "<|im_end|>"] if chat_template else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = list(corpus) if corpus is not None else CORPUS * 4
    tok.train_from_iterator(text, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:  # the corpus ran out of merges: pad with filler tokens
        tok.add_tokens([f"<extra_{i}>" for i in range(vocab_size - tok.get_vocab_size())])
    if add_bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS if add_bos else EOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=1 << 20,
    )
    if chat_template:
        wrapped.chat_template = chat_template
    assert len(wrapped) == vocab_size, (len(wrapped), vocab_size)
    return wrapped


# ----------------------------------------------------------------------------------------------
# Models

ARCHS = ("gpt2", "llama", "qwen2")


def tiny_config(arch: str, vocab_size: int, tokenizer=None, **overrides: Any):
    """A transformers config for a 2-layer, 32-wide model of `arch` (gpt2 | llama | qwen2)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if arch == "gpt2":
        cfg = dict(vocab_size=vocab_size, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2Config(**{**cfg, **ids, **overrides})
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**{**common, **ids, **overrides})
    if arch == "qwen2":
        return Qwen2Config(**{**common, **ids, **overrides})
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")


def make_model(arch: str, vocab_size: int, tokenizer=None, seed: int = 0, init_std: float = 0.5, **overrides: Any):
    """A tiny randomly initialised causal LM in float32, eval mode.

    `init_std` is larger than the usual 0.02 so the teacher's next-token distributions are
    peaked and varied (a near-uniform teacher makes top-k tests vacuous).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size, tokenizer, initializer_range=init_std, **overrides)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    return model


def save_teacher(
    directory: str | Path,
    arch: str = "gpt2",
    tokenizer_vocab: int = 300,
    model_vocab: int | None = None,
    seed: int = 0,
    add_bos: bool | None = None,
    chat_template: str | None = None,
    tokenizer=None,
) -> Path:
    """Save a tiny model and its tokenizer to `directory` (created); returns the directory.

    `model_vocab` > `tokenizer_vocab` gives a padded output vocabulary (as many real models have).
    `add_bos` defaults to True for llama (its tokenizers prepend BOS) and False otherwise.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = train_tokenizer(
            tokenizer_vocab, add_bos=(arch == "llama") if add_bos is None else add_bos, chat_template=chat_template
        )
    model = make_model(arch, model_vocab or len(tokenizer), tokenizer, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ----------------------------------------------------------------------------------------------
# Data files


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path


def instruction_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` prompt/response records of varied lengths built from CORPUS."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(CORPUS) for _ in range(rng.randint(1, 2)))[: rng.randint(10, 120)]
        response = " ".join(rng.choice(CORPUS) for _ in range(rng.randint(1, 2)))[: rng.randint(3, 100)]
        out.append({"prompt": f"Q{i}: {prompt}\n", "response": response})
    return out


def text_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    import random

    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(CORPUS) for _ in range(rng.randint(1, 3)))[: rng.randint(5, 200)]}
            for _ in range(n)]


def compiled_kernels_testable() -> bool:
    """Whether to test amid.fused's torch.compile'd kernels: on CUDA where they are on, or on the
    CPU (Inductor's C++ backend, ~20 s of compiling) when AMID_TEST_COMPILE=1."""
    import os

    import torch

    from amid import fused

    if os.environ.get("AMID_TEST_COMPILE") == "1":
        return True
    return torch.cuda.is_available() and fused.compiled_kernels_enabled(torch.zeros(1, device="cuda"))

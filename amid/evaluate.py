"""Evaluating a student: perplexity on data, and ROUGE-L of sampled generations (the AMiD /
MiniLLM metric) for instruction data. KL to the teacher on a cache's held-out split lives with
the trainer (`amid.train`), which owns that split.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from amid.data import (
    DataError, TemplateConfig, build_examples, chat_end_of_turn, closing_texts, dolly_prompt, field_text,
    load_records, record_messages, where,
)
from amid.heads import LOGIT_CHUNK_ELEMENTS, Head, context_length
from amid.loader import pad_examples

__all__ = ["rouge_l", "rouge_tokens", "perplexity", "generate_rouge", "EvalConfig", "evaluate"]


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """The `rouge-score` package's default tokenization: lowercase, non-alphanumerics split."""
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between two strings (LCS-based; no stemming), in [0, 1]."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def perplexity(model, tokenizer, source: str, template: TemplateConfig, limit: int | None = None,
               batch_size: int = 8, device: str | torch.device = "cpu", split: str = "train") -> dict[str, float]:
    """Cross-entropy and perplexity of the model on the target tokens of a dataset (and the
    template the records were read with: "auto" resolved)."""
    records = load_records(source, split=split, limit=limit)
    context = context_length(model)
    if context and template.max_length > context:  # longer inputs would index past the positions
        template = dataclasses.replace(template, max_length=context)
    examples, stats, resolved = build_examples(records, tokenizer, template, source)
    total_nll, total_tokens = 0.0, 0
    model.eval()
    # Logits of the target rows only, LOGIT_CHUNK_ELEMENTS at a time where the head is plain: a
    # batch of 8 x 1024 tokens at V = 151936 would otherwise be 5 GB of float32 logits.
    head = Head(model)
    width = head.head.weight.shape[0] if head.head is not None else model.config.vocab_size
    step = max(1, LOGIT_CHUNK_ELEMENTS // width)
    order = sorted(examples, key=lambda e: len(e.input_ids))  # less padding; the sums do not care
    for i in range(0, len(order), batch_size):
        batch = order[i: i + batch_size]
        inputs = pad_examples(batch, 0, device)
        targets = inputs["input_ids"].reshape(-1)[inputs["rows"] + 1]
        for j, z in enumerate(head.logit_chunks(inputs, step)):
            total_nll += torch.nn.functional.cross_entropy(
                z.float(), targets[j * step: (j + 1) * step], reduction="sum").item()
        total_tokens += len(targets)
    ce = total_nll / max(total_tokens, 1)
    return {"ce": ce, "ppl": math.exp(min(ce, 700.0)), "tokens": total_tokens, "examples": len(examples),
            "truncated": stats.truncated, "skipped_no_target": stats.skipped_empty,
            "max_length": template.max_length, "template": resolved}


@torch.no_grad()
def generate_rouge(model, tokenizer, source: str, prompt_field: str = "prompt", response_field: str = "response",
                   limit: int | None = None, seeds: Sequence[int] = (10, 20, 30, 40, 50), max_new_tokens: int = 256,
                   temperature: float = 1.0, top_p: float = 1.0, device: str | torch.device = "cpu",
                   save_to: str | Path | None = None, chat: bool = False, split: str = "train",
                   messages_field: str = "messages", chat_template_kwargs: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Sample a response per prompt for each seed; ROUGE-L F1 against the reference, averaged
    over examples then over seeds (the papers' protocol). Generations are saved as JSONL.
    With `chat`, each prompt is a user turn through the tokenizer's chat template (as training
    with `--template chat` saw it). Conversations (a `messages_field`) are scored on their last
    assistant turn, generated after the turns before it (through the chat template)."""
    records = load_records(source, split=split, limit=limit)
    if messages_field in records[0]:
        closing = closing_texts(tokenizer, "chat", TemplateConfig())  # a reference ending in a literal <|im_end|>
        conversations = [record_messages(r, messages_field, where(records, i, source), closing)
                         for i, r in enumerate(records)]
        keep = [i for i, c in enumerate(conversations) if len(c) > 1 and c[-1]["content"].strip()]
        prompts = [conversations[i][:-1] for i in keep]
        refs = [conversations[i][-1]["content"] for i in keep]
        chat = True
        wanted = "an assistant turn after some context"
        records_without = len(records) - len(keep)
    else:
        prompts, refs, response_field = _prompts_and_references(records, source, prompt_field, response_field)
        wanted = f"a '{response_field}'"
        records_without = len(records) - len(refs)
    if not refs:
        raise DataError(f"{source}: no record has {wanted} to score ROUGE-L against")
    model.eval()
    context = context_length(model)
    per_seed = []
    rows = []
    cut_prompts = set()
    stop_ids = _stop_ids(model, tokenizer, chat)
    for seed in seeds:
        torch.manual_seed(seed)
        scores = []
        for i, (prompt, ref) in enumerate(zip(prompts, refs)):
            enc = _encode_prompt(tokenizer, prompt, chat, chat_template_kwargs).to(device)
            new_tokens = max_new_tokens
            if context:  # prompt + generation must fit the model's positions
                new_tokens = min(max_new_tokens, max(1, context // 2))
                keep_prompt = context - new_tokens
                if enc["input_ids"].shape[1] > keep_prompt:  # keep the prompt's end: the question and its cue
                    enc = {k: v[:, -keep_prompt:] for k, v in enc.items()}
                    cut_prompts.add(i)
                new_tokens = min(max_new_tokens, context - enc["input_ids"].shape[1])
            out = model.generate(
                **enc, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                top_p=top_p, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                eos_token_id=stop_ids,
            )
            text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            score = rouge_l(text, ref)
            scores.append(score)
            rows.append({"seed": seed, "prompt": prompt, "reference": ref, "generation": text, "rougeL": score})
        per_seed.append(sum(scores) / len(scores))
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        with open(save_to, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    mean = sum(per_seed) / len(per_seed)
    return {"rougeL": 100 * mean, "rougeL_per_seed": [100 * s for s in per_seed], "rouge_examples": len(prompts),
            "rouge_skipped_no_reference": records_without, "rouge_prompts_cut": len(cut_prompts)}


def _prompts_and_references(records, source: str, prompt_field: str, response_field: str):
    """(prompts, references, the response field used) of prompt/response (or Dolly) records;
    records without a reference response are left out (their ROUGE-L would be 0 by definition)."""
    if response_field not in records[0] and "output" in records[0]:
        response_field = "output"
    fields = set(records[0])
    if response_field not in fields or (prompt_field not in fields and "instruction" not in fields):
        raise DataError(f"{source}: ROUGE-L needs '{prompt_field}' (or Dolly's 'instruction') and "
                        f"'{response_field}' fields, or a messages field; the data has {sorted(fields)}")
    keep = [i for i, r in enumerate(records) if field_text(r, response_field, where(records, i, source)).strip()]
    prompts = [field_text(records[i], prompt_field, where(records, i, source)) or dolly_prompt(records[i]) for i in keep]
    refs = [field_text(records[i], response_field, where(records, i, source)) for i in keep]
    return prompts, refs, response_field


def _stop_ids(model, tokenizer, chat: bool) -> list[int] | None:
    """Token ids that end a generation: the model's own EOS ids, and with `chat` the special token
    that closes an assistant turn in the chat template (Qwen's <|im_end|>, Llama 3's <|eot_id|>),
    which training with --template chat taught the student to emit where the turn ends."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if chat and (turn_end := chat_end_of_turn(tokenizer)) is not None:
        ids.append(turn_end)
    return sorted(set(ids)) or None


def _encode_prompt(tokenizer, prompt: str | list[dict[str, str]], chat: bool,
                   chat_template_kwargs: dict[str, Any] | None = None):
    """A prompt's input ids: text as it is, or through the chat template (a user turn, or the
    conversation so far) with the generation prompt and the template's own arguments."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("template 'chat' needs a tokenizer with a chat template; this one has none")
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True,
                                         **(chat_template_kwargs or {}))


@dataclass(frozen=True)
class EvalConfig:
    model: str
    data: str
    template: str = "auto"
    prompt_field: str = "prompt"
    response_field: str = "response"
    text_field: str = "text"
    messages_field: str = "messages"
    chat_template_kwargs: dict[str, Any] | None = None
    chat_turns: str = "all"
    max_length: int = 1024
    limit: int | None = None
    split: str = "train"  # of a datasets name or a save_to_disk DatasetDict
    rouge: bool = False
    rouge_limit: int | None = None  # prompts scored by ROUGE-L (default: the same as limit)
    seeds: tuple[int, ...] = (10, 20, 30, 40, 50)
    max_new_tokens: int = 256
    device: str = "auto"
    out: str | None = None

    def __post_init__(self) -> None:
        if self.rouge and not self.seeds:
            raise ValueError("--seeds must name at least one sampling seed for --rouge, e.g. --seeds 10,20")
        if self.max_length < 2 or self.max_new_tokens < 1:
            raise ValueError(f"--max-length must be at least 2 and --max-new-tokens at least 1, got "
                             f"{self.max_length} and {self.max_new_tokens}")


def evaluate(cfg: EvalConfig, log=lambda message: None) -> dict[str, Any]:
    """Perplexity (and ROUGE-L if asked) of a model directory or a run directory's final model.
    `log` gets notes (an earlier evaluation replaced in --out)."""
    from amid.cache import write_json_atomic
    from amid.distributed import world_from_env

    if world_from_env()[2] > 1:  # every rank would evaluate everything and write the same files
        raise ValueError("amid eval runs in one process; run it without torchrun (--device picks the GPU)")
    from amid.models import load_model, load_tokenizer, resolve_model
    from amid.teacher import resolve_device

    device = resolve_device(cfg.device)
    # A run directory gives its final model, else its last checkpoint (amid.models.resolve_model).
    tokenizer = load_tokenizer(cfg.model, "--model")
    model = load_model(cfg.model, "--model").to(device)
    template = TemplateConfig(template=cfg.template, prompt_field=cfg.prompt_field,
                              response_field=cfg.response_field, text_field=cfg.text_field,
                              messages_field=cfg.messages_field, chat_template_kwargs=cfg.chat_template_kwargs,
                              chat_turns=cfg.chat_turns, max_length=cfg.max_length, overflow="truncate")
    result: dict[str, Any] = {"model": cfg.model, "model_dir": resolve_model(cfg.model),
                              "data": cfg.data, "template": cfg.template, **template.chat_settings()}
    result.update(perplexity(model, tokenizer, cfg.data, template, limit=cfg.limit, device=device, split=cfg.split))
    if cfg.rouge:
        save = Path(cfg.out) / "generations.jsonl" if cfg.out else None
        result.update(generate_rouge(model, tokenizer, cfg.data, cfg.prompt_field, cfg.response_field,
                                     limit=cfg.rouge_limit or cfg.limit, seeds=cfg.seeds, max_new_tokens=cfg.max_new_tokens,
                                     device=device, save_to=save, chat=cfg.template == "chat", split=cfg.split,
                                     messages_field=cfg.messages_field, chat_template_kwargs=cfg.chat_template_kwargs))
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        stale = not cfg.rouge and (out / "generations.jsonl").exists()
        if stale:  # an earlier evaluation's generations would pass for this one's
            (out / "generations.jsonl").unlink()
        if (out / "eval.json").exists() or stale:
            log(f"note: {out / 'eval.json'} replaced an earlier evaluation's"
                + (" (its generations.jsonl removed: this one has no --rouge)" if stale else ""))
        write_json_atomic(out / "eval.json", result)
    return result

"""Stage two: distill a student from a teacher cache (issue 4).

`train(TrainConfig(cache=..., student=..., out=...))` runs a plain loop:

    for each step: grad_accum micro-batches from the cache (background loader)
                   loss = mean over target positions of (1 − w)·AMiD(k + 1 bins) + w·CE
                          [+ lm_weight · mean CE on as many batches of plain text (lm_data)]
                   backward, clip, AdamW, learning-rate schedule (a function of the step)
                   log to metrics.jsonl; evaluate / checkpoint when due

No teacher is loaded: its top-k log-probabilities and tail mass come from the cache. Outputs in
the run directory:

    config.json       the settings, and what they resolved to ("resolved": loss, device, dtype, steps)
    metrics.jsonl     one object per logging step (step, loss, lr, tokens_per_s, ...) and one
                      per evaluation (step, eval_loss, eval_kl, eval_ce, eval_ppl)
    checkpoint/       the student (save_pretrained, safetensors), its tokenizer and
                      trainer_state.pt (optimizer, RNG, data position, step); replaced atomically
    final/            the trained student and tokenizer, loadable by plain transformers
    summary.json      what `train` returns

`resume=True` continues from checkpoint/; on CPU the resumed run's losses equal an
uninterrupted run's step for step (same data order, optimizer state and RNG state).

Under torchrun (WORLD_SIZE > 1) the run is data-parallel (`amid.distributed`): W processes with
`grad_accum` A take the steps one process with A × W would take (exactly, for a student without
dropout), each rank training on its share of every step's batches; rank 0 writes the run
directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from amid import __version__
from amid.cache import Cache, fsync_dir, open_cache, sha256_bytes, write_json_atomic
from amid.data import DataError, cut_batches, lm_blocks
from amid.distributed import Ranks, start_ranks, world_from_env
from amid.errors import first_line
from amid.heads import LOGIT_CHUNK_ELEMENTS, Head, TargetLogits, context_length
from amid.loader import LMStream, Loader, Plan, Position, collate, scan, split
from amid.lock import DirLock
from amid.losses import LossConfig, full_loss, mix_ce, sparse_loss
from amid.models import load_model, load_tokenizer, resolve_model
from amid.paths import same_path, same_setting
from amid.stop import SIGNALS as STOP_SIGNALS
from amid.stop import Interrupted, StopRequest, signal_name
from amid.teacher import architecture, resolve_device, resolve_dtype, tokenizer_identity

__all__ = ["TrainConfig", "TrainError", "TrainingDiverged", "train", "SCHEDULES", "DTYPES"]

SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("auto", "bf16", "fp16", "fp32")
STATE_FILE = "trainer_state.pt"
LOCK_FILE = ".lock"
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint", "final")  # what makes a directory a run's
# What may already sit in a fresh run's directory: what a sweep writes before its run starts.
RUN_NEIGHBOURS = frozenset({"summary.json", "sweep_run.json", "log.txt", "result.json", "eval.json"})
FUSED_MIN_VOCAB = 16384
# Evaluation takes the logits LOGIT_CHUNK_ELEMENTS at a time where the model's head can be applied
# alone (`Head.plain`): a held-out batch then costs no more memory than a fused training step.
# Other models return all their logits.
EVAL_CHUNK_ELEMENTS = LOGIT_CHUNK_ELEMENTS
LOSS_FIELDS = ("alpha", "lam", "lam_end", "divergence", "order", "ab_alpha", "ab_beta", "jsd_beta", "ce_weight",
               "tail", "stop_grad_r")
KL = LossConfig.preset("kd")  # eval_kl: KL(p̄ ‖ q̄) over the k + 1 bins
CE = LossConfig.preset("ce")  # the plain language-modelling loss on lm_data
# Fields that may change between a run and its resumption; any other change is refused.
RESUMABLE_CHANGES = frozenset(
    {"resume", "progress", "num_workers", "device", "dtype", "fused", "log_every", "eval_every",
     "save_every", "max_steps", "epochs", "student", "eval_teacher", "lr", "clip"}
)
# Of those, the ones that change the optimisation from the checkpoint on (a note says so): a
# diverged run is resumed with a lower --lr or a --clip; --max-steps/--epochs move the schedule.
STEERING_CHANGES = ("lr", "clip", "max_steps", "epochs")
# Settings added after runs could already be saved, with the value that reproduces a run saved
# without them: resuming such a run keeps that value (its data plan must not move under it).
ADDED_SETTINGS = {"shuffle_tokens": None}


class TrainError(RuntimeError):
    """A run that cannot start or continue: incompatible student, bad run directory, ..."""


class TrainingDiverged(TrainError):
    """The loss or the gradient became NaN/inf; the message names the step and the checkpoint."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything `amid train` needs; saved as RUN_DIR/config.json.

    Batches hold `batch_size` sequences, or with `max_tokens` as many as fit in that many padded
    tokens. A step is `grad_accum` batches (on each of W processes under torchrun: A × W in all).
    `max_steps`, if set, overrides `epochs`.
    `warmup_steps` None means 3 % of the steps. `eval_fraction` of the cache's examples (chosen
    by a hash of their record: stable) is held out, at most `eval_max_examples` of them used;
    `eval_cache` instead evaluates on a separate cache and trains on all of `cache`.
    `fused` None: the fused LM-head loss for vocabularies of at least FUSED_MIN_VOCAB tokens
    (below that the logits are small and compiling the fused kernels does not pay). On the CPU
    too: a 4.9M-parameter student at V = 151936 trained 20 steps in 0.84x the time and 0.32x the
    peak memory of materialised logits (benchmarks/RESULTS.md, "The fused loss in training").
    `online_teacher`: instead of the cache's top-k, run this teacher on every batch and use the
    full-vocabulary loss (`full_loss`): the reference the cache is compared against. The cache
    still supplies the data and the held-out split; evaluation adds eval_kl_full, the
    full-vocabulary KL(p ‖ q) to that teacher. `eval_teacher`: train from the cache as usual but
    keep this teacher in memory for evaluation only, which then adds eval_kl_full too: how far
    the cache's top-k student is from the teacher over the whole vocabulary.

    The objective is `preset` with the loss fields that are not None as overrides (see
    `amid.losses.LossConfig`); `loss` is the resulting LossConfig.
    """

    cache: str
    student: str
    out: str
    preset: str = "amid"
    alpha: float | None = None
    lam: float | None = None
    lam_end: float | None = None
    divergence: str | None = None
    order: str | None = None
    ab_alpha: float | None = None
    ab_beta: float | None = None
    jsd_beta: float | None = None
    ce_weight: float | None = None
    tail: str | None = None
    stop_grad_r: bool | None = None
    lr: float = 5e-5
    schedule: str = "cosine"
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 8
    max_tokens: int | None = None
    grad_accum: int = 1
    clip: float | None = 1.0
    epochs: int = 1
    max_steps: int | None = None
    eval_cache: str | None = None
    eval_fraction: float = 0.05
    eval_max_examples: int = 1000
    eval_every: int = 500
    log_every: int = 10
    save_every: int = 500
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    fused: bool | None = None
    online_teacher: str | None = None
    eval_teacher: str | None = None
    gradient_checkpointing: bool = False
    num_workers: int = 2
    shuffle_buffer: int = 4096
    shuffle_tokens: int | None = 1 << 21  # None: windows bounded by examples only
    lm_data: str | None = None
    lm_weight: float = 1.0
    lm_batch_size: int | None = None
    lm_length: int = 512
    lm_text_field: str = "text"
    resume: bool = False
    progress: bool = True
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        checks = [
            (0 < self.lr < math.inf, f"--lr must be positive and finite, got {self.lr}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "--warmup must be at least 0"),
            (self.seed >= 0, f"--seed must be at least 0, got {self.seed}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (0 <= self.weight_decay < math.inf, f"--weight-decay must be at least 0 and finite, got {self.weight_decay}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.max_tokens is None or self.max_tokens >= 1, f"--max-tokens must be at least 1, got {self.max_tokens}"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (self.clip is None or self.clip >= 0, f"--clip must be at least 0, got {self.clip}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1, got {self.max_steps}"),
            (0 <= self.eval_fraction < 1, f"--eval-fraction must be in [0, 1), got {self.eval_fraction}"),
            (self.eval_max_examples >= 1, f"eval_max_examples must be at least 1, got {self.eval_max_examples}"),
            (min(self.eval_every, self.log_every, self.save_every) >= 1,
             "--eval-every, --log-every and --save-every must be at least 1"),
            (self.num_workers >= 1, f"--num-workers must be at least 1, got {self.num_workers}"),
            (self.shuffle_buffer >= 1, f"--shuffle-buffer must be at least 1, got {self.shuffle_buffer}"),
            (self.shuffle_tokens is None or self.shuffle_tokens >= 1,
             f"--shuffle-tokens must be at least 1, got {self.shuffle_tokens}"),
            (self.lm_weight >= 0, f"--lm-weight must be at least 0, got {self.lm_weight}"),
            (self.lm_batch_size is None or self.lm_batch_size >= 1,
             f"--lm-batch-size must be at least 1, got {self.lm_batch_size}"),
            (not (self.online_teacher and self.eval_teacher
                  and os.path.normpath(self.online_teacher) != os.path.normpath(self.eval_teacher)),
             "--eval-teacher and --online-teacher name different teachers; the online teacher is the one evaluated"),
            (self.lm_length >= 2, f"--lm-length must be at least 2, got {self.lm_length}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.loss  # noqa: B018  (validates the preset and the overrides)

    @property
    def loss(self) -> LossConfig:
        overrides = {f: getattr(self, f) for f in LOSS_FIELDS if getattr(self, f) is not None}
        return LossConfig.preset(self.preset, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """From `to_dict`'s output (or a run's config.json: its "resolved" record is not a setting)."""
        fields = {k: v for k, v in d.items() if k != "resolved"}
        return cls(**{**fields, "adam_betas": tuple(fields["adam_betas"])})


# ----------------------------------------------------------------------------------------------
# Learning rate


def _warmup_steps(cfg: TrainConfig, total: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else int(0.03 * total)


def learning_rate(cfg: TrainConfig, step: int, total: int) -> float:
    """The learning rate of update `step` (0-based) of `total`: linear warmup, then the schedule
    down to lr · min_lr_ratio. A pure function of the step: the scheduler has no state to save."""
    warmup = _warmup_steps(cfg, total)
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape)


# ----------------------------------------------------------------------------------------------
# Student and compatibility


def _load_student(path: str, trust_remote_code: bool):
    tokenizer = load_tokenizer(path, "--student", trust_remote_code)
    # Master weights in float32; bf16/fp16 is autocast's business.
    model = load_model(path, "--student", trust_remote_code, dtype=torch.float32)
    return model, tokenizer


def _describe_tokenizer(ident: dict[str, Any]) -> str:
    return f"{ident.get('vocab_size')} tokens, vocab sha256 {str(ident.get('vocab_sha256'))[:12]}"


def check_tokenizer(student: str, cache: Cache, tokenizer=None, trust_remote_code: bool = False) -> None:
    """Refuse a student whose tokenizer is not the cache's (compared by vocabulary hash)."""
    if tokenizer is None:
        tokenizer = load_tokenizer(student, "--student", trust_remote_code)
    m = cache.manifest
    mine = tokenizer_identity(tokenizer)
    theirs = m["tokenizer"]
    teacher = m.get("teacher", {}).get("name_or_path", "?")
    if mine != theirs:
        raise TrainError(
            f"student {student} has a different tokenizer ({_describe_tokenizer(mine)}) than the cache "
            f"{cache.path} of teacher {teacher} ({_describe_tokenizer(theirs)}); distill into a student "
            f"that shares the teacher's tokenizer"
        )


def check_compatible(student: str, model, tokenizer, cache: Cache, log: Callable[[str], None] = print) -> None:
    """Refuse a student whose tokenizer is not the cache's or whose logits do not cover its ids."""
    check_tokenizer(student, cache, tokenizer)
    check_covered(student, _vocab_size(model), cache, log)


def check_covered(student: str, student_vocab: int, cache: Cache, log: Callable[[str], None] = print,
                  held_out: bool = False) -> None:
    """Refuse a student whose `student_vocab` logits do not cover the cache's (its teacher's).

    A teacher head padded beyond the tokenizer (Qwen2.5-7B: 152,064 rows for 151,665 tokens; its
    0.5B: 151,936) is covered by a student with fewer rows than the teacher's as long as every
    cached top-k id is one of them; the padding rows' mass stays in the cache's tail. `held_out`:
    the cache is an --eval-cache (a full-vocabulary one holds every padding row)."""
    m = cache.manifest
    if student_vocab >= int(m["vocab_size"]):
        return
    words = int(m["tokenizer"]["vocab_size"])
    refusal = f"student {student} has {student_vocab} output logits, fewer than the teacher's {m['vocab_size']} in {cache.path}"
    if student_vocab < words:
        raise TrainError(f"{refusal}; the student's vocabulary must cover the teacher's ({words} tokens)")
    largest = cache.largest_topk_id()
    if largest is None:
        raise TrainError(f"{refusal}, and its shards do not record their largest top-k id; the student's "
                         f"vocabulary must cover the teacher's")
    if largest[0] >= student_vocab:
        fix = ("cache the held-out data with a --top-k that leaves out the teacher's padding rows" if held_out
               else "this student cannot learn that token: pick one with a larger head")
        raise TrainError(f"{refusal}, and {largest[1]} holds top-k id {largest[0]}, beyond them (a padding row of "
                         f"the teacher's head); {fix}")
    if not held_out:
        log(f"note: student {student} has {student_vocab} output logits, the teacher {m['vocab_size']} (its head is "
            f"padded beyond the tokenizer's {words} tokens); every cached top-k id is below {student_vocab}: the "
            f"teacher's mass past them counts toward the cache's tail (an online or evaluation teacher's is dropped)")


def _vocab_size(model) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


class OnlineTeacher:
    """A teacher in memory, for the full-vocabulary reference path (`online_teacher`). Its logits
    come the way `cache-teacher` computed the cache's: the model in its own dtype (not under the
    trainer's autocast), the LM head in float32 on the target rows."""

    def __init__(self, model, temperature: float):
        self.target = TargetLogits(model)
        self.temperature = temperature

    @torch.no_grad()
    def logits(self, batch: dict[str, Any], width: int) -> torch.Tensor:
        """[N, width] float32 logits at the target rows, tempered like the cache, padded with −inf
        to the student's (possibly larger) vocabulary, or cut to it (a padded teacher head)."""
        (z,) = self.chunks(batch, width, max(1, len(batch["rows"])))  # one chunk: all rows
        return z

    @torch.no_grad()
    def chunks(self, batch: dict[str, Any], width: int, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        """The same logits, [r, width], rows_per_chunk rows at a time."""
        with torch.autocast(batch["input_ids"].device.type, enabled=False):
            for z in self.target.chunks(batch, rows_per_chunk):
                z = z / self.temperature
                if z.shape[-1] < width:
                    z = F.pad(z, (0, width - z.shape[-1]), value=-math.inf)
                elif z.shape[-1] > width:  # rows of a head padded beyond the tokenizer, past the student's
                    z = z[:, :width]  # (check_covered): no token; their (tiny) mass is dropped, renormalised
                yield z


def _load_teacher(name: str, cfg: TrainConfig, cache: Cache, device, log, flag: str) -> OnlineTeacher:
    """A teacher in memory (`online_teacher` or `eval_teacher`) in the dtype the cache's teacher
    ran in (float32 for caches that do not say), so that the two paths differ only by what the
    cache keeps (top-k, rounding). Refused unless its tokenizer, logits and architecture are
    those of the cache's teacher (its weights are not hashed again: another name gets a note)."""
    m = cache.manifest
    tokenizer = load_tokenizer(name, flag, cfg.trust_remote_code)
    if tokenizer_identity(tokenizer) != m["tokenizer"]:
        raise TrainError(f"teacher {name} has a different tokenizer than the cache {cache.path}")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(m.get("teacher_dtype"), torch.float32)
    model = load_model(name, flag, cfg.trust_remote_code, dtype=dtype).to(device).eval()
    theirs = m.get("teacher", {})
    if _vocab_size(model) != int(m["vocab_size"]):
        raise TrainError(f"teacher {name} has {_vocab_size(model)} output logits, the teacher of the cache "
                         f"{cache.path} had {m['vocab_size']}: pass the cache's teacher ({theirs.get('name_or_path')})")
    if "config" in theirs and architecture(model) != theirs["config"]:
        raise TrainError(f"teacher {name} is not the cache's teacher ({theirs.get('name_or_path')}): its "
                         f"architecture differs from the one in {cache.path / 'manifest.json'}")
    recorded = theirs.get("name_or_path", name)
    mine = resolve_model(name)  # a run directory: the model in it, as cache-teacher records it
    if not any(same_path(x, recorded) or os.path.normpath(x) == os.path.normpath(recorded) for x in (name, mine)):
        log(f"note: teacher {name} is not the name the cache {cache.path} was made with "
            f"({theirs.get('name_or_path')}); its weights are taken to be that teacher's")
    return OnlineTeacher(model, float(m.get("temperature", 1.0)))


def _lm_stream(cfg: TrainConfig, model, tokenizer, log) -> LMStream:
    """The plain-text stream for the language-modelling loss, tokenized with the student's tokenizer."""
    context = context_length(model)
    if context and cfg.lm_length > context:
        raise TrainError(f"--lm-length {cfg.lm_length} is longer than the student's context of {context}")
    try:
        blocks = lm_blocks(cfg.lm_data, tokenizer, cfg.lm_length, cfg.lm_text_field)
    except DataError as exc:
        raise TrainError(str(exc)) from None
    stream = LMStream(blocks, cfg.lm_batch_size or cfg.batch_size, cfg.seed)
    log(f"language-modelling data {cfg.lm_data}: {blocks.size:,} tokens in {len(blocks):,} blocks of "
        f"{cfg.lm_length}, {stream.batch_size} blocks beside each cache batch, weight {cfg.lm_weight}")
    return stream


def _fused_loss_fn():
    try:
        from amid.fused import fused_sparse_loss
    except ImportError:
        return None
    return fused_sparse_loss


# ----------------------------------------------------------------------------------------------
# Loss


def batch_loss(
    head: Head, batch: dict[str, Any], loss_cfg: LossConfig, fused, dtype: torch.dtype, teacher: "OnlineTeacher | None" = None
) -> torch.Tensor:
    """Per-position loss [N] (float32): (1 − w)·AMiD + w·CE on the ground-truth next token.

    Runs under the caller's autocast; the fused loss takes hidden states and head weights in one
    explicit `dtype` and manages its own precision, so it runs outside autocast. With an online
    teacher the AMiD term is the full-vocabulary `full_loss` against its logits."""
    w = loss_cfg.ce_weight
    cache_args = (batch["topk_ids"], batch["topk_logprobs"], batch["tail_logmass"])
    if fused is None:
        logits = head.logits(batch)
        kd = None
        if w < 1:
            kd = (sparse_loss(logits, *cache_args, loss_cfg, check_ids=False) if teacher is None
                  else full_loss(logits, teacher.logits(batch, logits.shape[-1]), loss_cfg))
        ce = F.cross_entropy(logits.float(), batch["targets"], reduction="none") if w > 0 else None
        return mix_ce(kd, ce, loss_cfg)
    h = head.hidden(batch).to(dtype)
    weight = head.head.weight.to(dtype)
    bias = None if head.head.bias is None else head.head.bias.to(dtype)
    with torch.autocast(h.device.type, enabled=False):
        kd = fused(h, weight, bias, *cache_args, loss_cfg, check_ids=False) if w < 1 else None
        ce = None
        if w > 0:
            # −log q(target) is KL from a one-hot teacher over 2 bins: no [N, V] logits either.
            zeros = torch.zeros_like(batch["tail_logmass"])
            ce = fused(h, weight, bias, batch["targets"][:, None], zeros[:, None], zeros - math.inf, KL)
    return mix_ce(kd, ce, loss_cfg)


@torch.no_grad()
def evaluate(
    head: Head, batches: list[dict[str, Any]], loss_cfg: LossConfig, device, autocast, teacher: OnlineTeacher | None = None,
    ranks: Ranks = Ranks(), chunk_elements: int | None = None,
) -> dict[str, float]:
    """Held-out eval_loss (the training objective), eval_kl (KL(p̄ ‖ q̄), k + 1 bins), eval_ce and
    eval_ppl (ground-truth next tokens), each a mean over target positions. With an online
    teacher also eval_kl_full, the full-vocabulary KL(p ‖ q). Under data parallelism each rank
    passes its share of the batches and every rank gets the means over all of them. The logits
    (the student's and the teacher's) are taken `chunk_elements` (default EVAL_CHUNK_ELEMENTS)
    at a time (computed so for models whose head can be applied alone; other models' full logits
    are only sliced)."""
    model = head.model
    was_training = model.training
    model.eval()
    sums = {"eval_loss": 0.0, "eval_kl": 0.0, "eval_ce": 0.0}
    if teacher is not None:
        sums["eval_kl_full"] = 0.0
    n = 0
    width = _vocab_size(model)
    rows_per_chunk = max(1, (chunk_elements or EVAL_CHUNK_ELEMENTS) // width)
    for cpu_batch in batches:
        batch = _to_device(cpu_batch, device)
        student = head.logit_chunks(batch, rows_per_chunk)
        judged = teacher.chunks(batch, width, rows_per_chunk) if teacher is not None else None
        for i in range(0, len(batch["rows"]), rows_per_chunk):
            with autocast():  # the model's forward (with the first chunk) and head; the losses outside it
                logits = next(student)
            part = slice(i, i + rows_per_chunk)
            cache_args = (batch["topk_ids"][part], batch["topk_logprobs"][part], batch["tail_logmass"][part])
            ce = F.cross_entropy(logits.float(), batch["targets"][part], reduction="none")
            kd = sparse_loss(logits, *cache_args, loss_cfg, check_ids=False) if loss_cfg.ce_weight < 1 else None
            sums["eval_loss"] += mix_ce(kd, ce, loss_cfg).sum().item()
            sums["eval_kl"] += sparse_loss(logits, *cache_args, KL, check_ids=False).sum().item()
            sums["eval_ce"] += ce.sum().item()
            if judged is not None:
                sums["eval_kl_full"] += full_loss(logits, next(judged), KL).sum().item()
        n += len(batch["rows"])
    model.train(was_training)
    *totals, n = ranks.sum_numbers([*sums.values(), n])
    out = {k: v / max(n, 1) for k, v in zip(sums, totals)}
    out["eval_ppl"] = math.exp(min(out["eval_ce"], 700.0))
    return out


def _to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Data


def _eval_batches(cache: Cache, rows: list[np.ndarray], metas, cfg: TrainConfig, pad_id: int) -> list[dict]:
    examples, lengths = [], []
    for s, r in enumerate(rows):
        if len(r):
            examples.extend(cache.iter_shard(s, rows=r))
            lengths.extend(metas[s].lengths[r].tolist())
    order = np.argsort(lengths, kind="stable")
    groups = cut_batches([examples[i] for i in order], [lengths[i] for i in order],
                         None if cfg.max_tokens else cfg.batch_size, cfg.max_tokens)
    return [collate(g, pad_id) for g in groups]


def _check_eval_cache(cache: Cache, eval_cache: Cache) -> None:
    """An eval cache may have another k (a full-vocabulary one gives the exact KL), not another
    tokenizer, a larger vocabulary or another temperature (its KL would be to another teacher)."""
    if eval_cache.manifest["tokenizer"] != cache.manifest["tokenizer"]:
        raise TrainError(f"eval cache {eval_cache.path} has a different tokenizer than {cache.path}")
    if int(eval_cache.manifest["vocab_size"]) > int(cache.manifest["vocab_size"]):
        raise TrainError(f"eval cache {eval_cache.path} has a larger vocabulary than {cache.path}")
    theirs, mine = (float(c.manifest.get("temperature", 1.0)) for c in (eval_cache, cache))
    if theirs != mine:
        raise TrainError(f"eval cache {eval_cache.path} was made at temperature {theirs}, {cache.path} at {mine}; "
                         f"cache the held-out data at the training cache's temperature")
    # The same teacher: the same architecture, and the same weights where both caches hashed them
    # (local teachers); hub teachers without a hash by name and revision. The dtype may differ.
    # A local teacher against a hub one cannot be told apart here, and is let through.
    a, b = ((c.manifest.get("teacher") or {}) for c in (eval_cache, cache))
    if "weights_sha256" in a and "weights_sha256" in b:
        keys = ("config", "weights_sha256")
    elif "weights_sha256" not in a and "weights_sha256" not in b:
        keys = ("config", "name_or_path", "revision")
    else:
        keys = ("config",)
    if any(a.get(k) != b.get(k) for k in keys):
        raise TrainError(f"eval cache {eval_cache.path} was made by another teacher "
                         f"({(eval_cache.manifest.get('teacher') or {}).get('name_or_path')}) than {cache.path} "
                         f"({(cache.manifest.get('teacher') or {}).get('name_or_path')}); its KL would be to that "
                         f"teacher: cache the held-out data with the training cache's teacher")


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)


def save_model_dir(path: Path, model, tokenizer, state: dict[str, Any] | None = None) -> None:
    """Write model + tokenizer (+ trainer state) to `path` atomically: a temporary directory,
    fsync, then rename; a crash leaves the previous `path` or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if state is not None:
            torch.save(state, tmp / STATE_FILE)
        _fsync_tree(tmp)
    except (OSError, RuntimeError) as exc:  # a full disk: torch.save's says "unexpected pos ..."
        shutil.rmtree(tmp, ignore_errors=True)
        reason = first_line(exc)
        full = getattr(exc, "errno", None) == errno.ENOSPC or "unexpected pos" in reason
        kept = f"the previous {path.name} is kept; " if path.exists() else ""
        raise TrainError(f"{path}: writing it failed ({reason}{'; is the disk full?' if full else ''}); {kept}"
                         f"{'free space and ' if full else ''}continue with the same command and --resume") from None
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)  # the renames themselves survive a power loss
    shutil.rmtree(old, ignore_errors=True)


def _recover_checkpoint(path: Path) -> None:
    """A crash between the two renames of `save_model_dir` leaves only `.NAME.old`: restore it."""
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.exists():
        os.replace(old, path)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """The generators a step draws from: the CPU's and the one of the GPU this process trains on
    (not every visible GPU's: a resume may see fewer GPUs, or this one under another index)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # checkpoints of amid 0.5.0 and earlier: every visible GPU's generator
        index = device.index or 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_run_dir(cfg: TrainConfig, log, ranks: Ranks, lock: DirLock) -> dict[str, Any] | None:
    """Check the run directory; returns the trainer state to resume from, or None for a fresh run.
    Writes nothing but, in an existing directory, its lock file and (once it holds the lock) the
    recovery of an interrupted checkpoint rename and the removal of a killed run's JSON
    temporaries (rank 0)."""
    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    if _foreign_dir(out):
        raise TrainError(f"{out}: holds a model or a cache, not an amid run (its config.json or manifest.json "
                         f"would be overwritten); choose an empty or new --out")
    if not cfg.resume and out.is_dir() and not any((out / name).exists() for name in RUN_FILES):
        others = sorted(f.name for f in out.iterdir() if not f.name.startswith(".") and f.name not in RUN_NEIGHBOURS)
        if others:
            raise TrainError(f"{out}: holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}), "
                             f"which a run's would sit among; choose an empty or new --out")
    lock.take()  # before the first write below: another run may be writing this directory
    if ranks.main:
        _recover_checkpoint(ckpt)
        for name in ("config.json", "summary.json"):  # a killed run's half-written ones (rank 0 writes them)
            for stale in out.glob(f".{name}.tmp-*"):
                stale.unlink(missing_ok=True)
    ranks.barrier()
    has_ckpt = (ckpt / STATE_FILE).exists()
    if not cfg.resume:
        if any((out / name).exists() for name in RUN_FILES):
            raise TrainError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
        return None
    if not has_ckpt:
        log(f"{out}: no checkpoint to resume from; starting from step 0")
        return None
    try:
        # Memory-mapped: under torchrun every rank reads the optimizer state, the page cache holds it once.
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False, mmap=True)
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise ValueError("not a trainer state")
    except Exception as exc:  # truncated, overwritten or foreign: unpickling errors vary by damage
        raise TrainError(_damaged_checkpoint(ckpt / STATE_FILE, exc, ckpt)) from None
    saved = state["config"]
    saved_world, saved_accum = state.get("world_size", 1), saved.get("grad_accum", 1)
    per_step = saved_world * saved_accum  # batches a step: what the data plan and the schedule follow
    if saved_world != ranks.world and per_step != ranks.world * cfg.grad_accum:
        fits = (f"--grad-accum {per_step // ranks.world} on {ranks.world} process(es)" if per_step % ranks.world == 0
                else "in one process (no launcher)" if saved_world == 1
                else f"under torchrun --nproc-per-node {saved_world}")
        raise TrainError(
            f"{out}: the run was trained by {saved_world} process(es) with --grad-accum {saved_accum}, {per_step} "
            f"batches a step; this is {ranks.world} x {cfg.grad_accum}; resume {fits} (the same batches a step), "
            f"or choose another --out"
        )
    if not same_path(cfg.student, saved.get("student", cfg.student)):
        log(f"note: --student {cfg.student} is not the student this run started from ({saved.get('student')}); "
            f"the run continues from its checkpoint, which holds the weights")
    if saved_world != ranks.world:
        log(f"note: resuming a run of {saved_world} process(es) x --grad-accum {saved_accum} on {ranks.world} x "
            f"{cfg.grad_accum}: the same batches a step; a student with dropout draws its masks per process, so "
            f"it departs from an uninterrupted run")
    legacy = {k: v for k, v in ADDED_SETTINGS.items() if saved.get(k, v) == v}
    # The run directory is where the checkpoint was found; the cache is compared by content
    # once it is open (`cache_id`), by path only for checkpoints older than that record. Another
    # --grad-accum is the other half of another number of processes (checked above).
    # Likewise --lm-data (by its tokenized blocks, `lm_id`), where the run had one and still has.
    moved_lm = "lm_id" in state and saved.get("lm_data") is not None and cfg.lm_data is not None
    exempt = (RESUMABLE_CHANGES | {"out"} | ({"cache"} if "cache_id" in state else set())
              | ({"lm_data"} if moved_lm else set())
              | ({"grad_accum"} if saved_world != ranks.world else set()))
    # The objective is compared as resolved (`--preset amid` and `--alpha 0.5 --lam 0.1` are one
    # loss), field by field of the LossConfig; the other settings as given.
    was = TrainConfig.from_dict({**saved, **legacy})
    changed = sorted(
        {k for k, v in was.to_dict().items()
         if k not in exempt | {"preset", *LOSS_FIELDS} and k not in legacy and not same_setting(cfg.to_dict()[k], v)}
        | {k for k, v in dataclasses.asdict(was.loss).items() if k != "name" and not same_setting(getattr(cfg.loss, k), v)}
    )
    if changed:
        raise TrainError(
            f"{out}: the run was started with different {', '.join(changed)}; resume with the same "
            f"settings (see {out / 'config.json'}) or choose another --out"
        )
    state["legacy"] = {k: v for k, v in legacy.items() if getattr(cfg, k) != v}
    steered = [f"{k} {saved.get(k)} -> {getattr(cfg, k)}" for k in STEERING_CHANGES if saved.get(k) != getattr(cfg, k)]
    if steered:
        log(f"note: resuming {out} with {', '.join(steered)}: from step {state['step']} on the run follows the new "
            f"settings (the learning-rate schedule is a function of the step and the total), so it no longer "
            f"equals an uninterrupted run")
    return state


def _foreign_dir(path: Path) -> bool:
    """Whether `path` is a model directory or a cache (a config.json that is not a TrainConfig's,
    or a cache manifest): a run written there would overwrite what makes it one."""
    if (path / "manifest.json").exists():
        return True
    if not (path / "config.json").exists():
        return False
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):  # a damaged run's config.json (its checkpoint holds the settings) or a foreign one
        return not any((path / name).exists() for name in ("checkpoint", "metrics.jsonl"))
    return not (isinstance(config, dict) and {"cache", "student", "out"} <= set(config))


def _damaged_checkpoint(what: Path, exc: BaseException, ckpt: Path) -> str:
    # Damage (a truncated or overwritten file) and a checkpoint written by other versions of
    # torch/numpy/transformers fail alike here; moving the checkpoint away costs the run's steps,
    # so the message names both causes and lets the reader's error decide.
    reason = first_line(exc)
    return (f"{what}: checkpoint cannot be read ({type(exc).__name__}: {reason[:120]}); if it was written by "
            f"other versions of torch/numpy/transformers, resume with those; if it is damaged, move {ckpt} away "
            f"to restart the run from step 0, or choose another --out")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in order; a line half-written by a killed run is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint (a killed run went further than it saved)."""
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in keep))  # as write_metrics wrote them
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ----------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run stage two; returns a summary (also written to RUN_DIR/summary.json).

    Raises TrainError for an incompatible student or run directory (before any step),
    TrainingDiverged for a NaN/inf loss or gradient (the last checkpoint is kept), CacheError for
    a missing or damaged cache, `amid.stop.Interrupted` (a KeyboardInterrupt) on SIGINT or SIGTERM,
    after the step in hand and a checkpoint of it. Under torchrun every rank calls this; only rank 0 logs.
    """
    device = _train_device(cfg)
    ranks = start_ranks(device)
    lock = run_lock(Path(cfg.out), enabled=ranks.main)
    try:
        return _train(cfg, device, ranks, log if ranks.main else _silent, lock)
    finally:
        lock.release()
        ranks.close()


def run_lock(out: Path, enabled: bool = True) -> DirLock:
    """The lock rank 0 holds on RUN_DIR/.lock while it trains (amid.lock); a directory that does
    not exist yet is locked once it is made."""
    return DirLock(out, LOCK_FILE, enabled=enabled, busy=lambda: TrainError(
        f"{out}: another amid train is running in this directory; wait for it to end (or stop it) before "
        f"resuming, or choose another --out"))


def _silent(_message: str) -> None:
    pass


def _train_device(cfg: TrainConfig) -> torch.device:
    """The device of this process: under torchrun each rank takes the GPU of its LOCAL_RANK."""
    device = resolve_device(cfg.device)
    _, local_rank, world = world_from_env()
    if world > 1 and device.type == "cuda":
        if cfg.device not in ("auto", "cuda"):
            raise TrainError(f"--device {cfg.device} names one GPU, but under torchrun each of the {world} "
                             f"processes takes its own (cuda:LOCAL_RANK); pass --device cuda or auto")
        device = torch.device("cuda", local_rank)
    return device


def _train(cfg: TrainConfig, device: torch.device, ranks: Ranks, log: Callable[[str], None],
           lock: DirLock | None = None) -> dict[str, Any]:
    start_time = time.time()
    out = Path(cfg.out)
    lock = lock or run_lock(out, enabled=False)
    existed = out.is_dir()  # what _prepare_run_dir checks (and locks, if it exists)
    resume_state = _prepare_run_dir(cfg, log, ranks, lock)
    views = ranks.gather(None if resume_state is None else (resume_state["step"], resume_state["position"]))
    if any(v != views[0] for v in views):  # else their collectives would no longer pair up
        raise TrainError(f"{out}: the {ranks.world} processes see different checkpoints (steps "
                         f"{', '.join('none' if v is None else str(v[0]) for v in views)}); every process must "
                         f"see the same --out: put it on a shared file system")
    if resume_state is not None and resume_state["legacy"]:
        cfg = dataclasses.replace(cfg, **resume_state["legacy"])
        log(f"{out}: this run predates {', '.join(resume_state['legacy'])}; resuming it as it ran "
            f"({', '.join(f'{k}={v}' for k, v in resume_state['legacy'].items())})")
    ckpt_dir = out / "checkpoint"

    # --- cache, student, compatibility
    cache = open_cache(cfg.cache)
    cache_id = cache.content_id
    if len(set(ranks.gather(cache_id))) > 1:  # on several nodes each reads its own copy at --cache
        raise TrainError(f"{cfg.cache}: the {ranks.world} processes read different caches under this path (their "
                         f"shards differ); every process must see the same cache: put it on a shared file system "
                         f"or copy the same one to every node")
    if resume_state is not None and resume_state.get("cache_id", cache_id) != cache_id:
        raise TrainError(f"{cfg.cache}: not the cache this run was trained on (its shards differ from the "
                         f"ones {ckpt_dir} recorded); resume with that cache, or choose another --out")
    if resume_state is not None:
        try:
            model, tokenizer = _load_student(str(ckpt_dir), cfg.trust_remote_code)
        except Exception as exc:  # safetensors/transformers errors of a damaged directory vary
            raise TrainError(_damaged_checkpoint(ckpt_dir, exc, ckpt_dir)) from None
    else:
        _seed_everything(cfg.seed)  # weights the student's checkpoint lacks are initialised: the same in every run
        model, tokenizer = _load_student(cfg.student, cfg.trust_remote_code)
    check_compatible(cfg.student, model, tokenizer, cache, log)
    log(f"amid train: config {json.dumps(cfg.to_dict())}; loss {json.dumps(dataclasses.asdict(cfg.loss))}")
    loss = cfg.loss
    unused = [f for f in LOSS_FIELDS if f != "ce_weight" and getattr(cfg, f) is not None]
    if loss.ce_weight == 1.0 and unused:
        flags = ", ".join("--" + f.replace("_", "-") for f in unused)
        log(f"note: {flags} {'has' if len(unused) == 1 else 'have'} no effect here: with --ce-weight 1 (preset "
            f"{cfg.preset}) the loss is plain cross-entropy on the ground-truth tokens, with no teacher term")
    elif cfg.alpha is not None and loss.lam in (0.0, 1.0) and loss.lam_end is None:
        log(f"note: --alpha {cfg.alpha} has no effect here: with λ = {loss.lam:g} (preset {cfg.preset}) the mixture is "
            f"the {'student' if loss.lam == 0 else 'teacher'} whatever α is; pass --lam between 0 and 1, or --preset amid")
    amp_dtype = resolve_dtype(cfg.dtype, device)
    model.to(device)
    ranks.broadcast_params(model.parameters())
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    head = Head(model)
    teacher = _load_teacher(cfg.online_teacher, cfg, cache, device, log, "--online-teacher") if cfg.online_teacher else None
    eval_teacher = teacher or (_load_teacher(cfg.eval_teacher, cfg, cache, device, log, "--eval-teacher")
                               if cfg.eval_teacher else None)
    fused = None
    big_vocab = _vocab_size(model) >= FUSED_MIN_VOCAB
    if teacher is None and (cfg.fused or (cfg.fused is None and big_vocab)):
        fused = _fused_loss_fn() if head.linear else None
        if fused is None and cfg.fused:
            log("note: --fused needs a plain linear LM head and amid.fused; using materialised logits")

    def autocast():
        if amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    # --- data: held-out split, plan, eval batches
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    metas = scan(cache)
    if cfg.eval_cache:
        eval_cache = open_cache(cfg.eval_cache)
        _check_eval_cache(cache, eval_cache)
        check_covered(cfg.student, _vocab_size(model), eval_cache, log, held_out=True)
        eval_metas = scan(eval_cache)
        _, eval_rows = split(eval_metas, 1.0, cfg.eval_max_examples)
        train_rows, _ = split(metas, 0.0, 0)
    else:
        eval_cache, eval_metas = cache, metas
        train_rows, eval_rows = split(metas, cfg.eval_fraction, cfg.eval_max_examples)
    context = context_length(model)
    for source, source_metas in ((cfg.cache, metas), (cfg.eval_cache, eval_metas)):
        longest = max((int(m.lengths.max()) for m in source_metas if len(m.lengths)), default=0)
        if source and context and longest > context:
            raise TrainError(f"{source}: examples of up to {longest} tokens, but the student {cfg.student} has a "
                             f"context of {context} positions; cache the data with --max-length {context} (or "
                             f"pick a student with a longer context)")
    plan = Plan(metas, train_rows, cfg.seed, cfg.batch_size, cfg.max_tokens, cfg.shuffle_buffer, cfg.shuffle_tokens)
    if plan.examples == 0:
        raise TrainError(f"{cfg.cache}: no training examples left after holding out --eval-fraction {cfg.eval_fraction} "
                         f"(at least one record, with every turn of a split conversation); pass --eval-fraction 0 "
                         f"or hold out a separate --eval-cache")
    eval_batches = _eval_batches(eval_cache, eval_rows, eval_metas, cfg, pad_id)
    # A step is grad_accum batches on each rank: grad_accum × world of the one stream.
    per_step = cfg.grad_accum * ranks.world
    if cfg.max_steps is not None:
        total_steps, loader_epochs = cfg.max_steps, None
    else:
        # Each epoch's plan is its own (with --max-tokens the number of batches varies a little).
        batches = sum(sum(len(b) for _, b in plan.epoch(e)) for e in range(cfg.epochs))
        total_steps, loader_epochs = math.ceil(batches / per_step), cfg.epochs

    if resume_state is not None and resume_state["step"] >= total_steps:
        log(f"{out}: already trained {resume_state['step']} of {total_steps} steps; nothing to do")
        summary_path = out / "summary.json"
        finished = _summary_of_step(summary_path, resume_state["step"])
        ranks.barrier()  # every rank has looked before rank 0 writes it below (else some would skip the barrier)
        if finished is not None:
            return finished
        # Killed after the last checkpoint, before final/ or summary.json (or the summary and final/ are
        # those of an earlier, shorter run this one extended): write them from the checkpoint.
        summary = _rebuilt_summary(out, resume_state, total_steps, ranks.world)
        if ranks.main:
            save_model_dir(out / "final", model, tokenizer)
            write_json_atomic(summary_path, summary)
        ranks.barrier()
        return summary

    lm_stream = _lm_stream(cfg, model, tokenizer, log) if cfg.lm_data else None
    lm_id = sha256_bytes(lm_stream.blocks.tobytes()) if lm_stream is not None else None
    if resume_state is not None and resume_state.get("lm_id", lm_id) != lm_id:
        raise TrainError(f"{cfg.lm_data}: not the --lm-data this run was trained on (its text, in blocks of "
                         f"{cfg.lm_length} tokens, differs from what {ckpt_dir} recorded); resume with that text, "
                         f"or choose another --out")

    # --- optimizer (decay on matrices only, nanoGPT style)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    step, tokens, position = 0, 0, Position()
    metrics_path = out / "metrics.jsonl"
    ranks.barrier()  # every rank has checked the run directory before rank 0 writes into it
    if resume_state is not None:
        step, tokens = resume_state["step"], resume_state["tokens"]
        position = Position(**resume_state["position"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        if ranks.main:
            _truncate_metrics(metrics_path, step)
            # An extended run is not done: its summary.json (of the shorter run) would say it is. final/
            # keeps the shorter run's model until this one writes its own.
            (out / "summary.json").unlink(missing_ok=True)
        rngs = resume_state.get("rng_ranks") or [resume_state["rng"]]
        if ranks.rank < len(rngs):
            _set_rng_state(rngs[ranks.rank], device)
        else:  # a rank the run did not have (resumed on more processes): a stream of its own
            _seed_everything(cfg.seed + ranks.rank + 7919 * step)
        log(f"resuming {out} at step {step} (epoch {position.epoch}, window {position.window}, batch {position.batch})")
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no directory behind
        lock.take()
        if not existed and any((out / name).exists() for name in RUN_FILES):
            # --out did not exist when _prepare_run_dir looked: another amid train made it since
            # (and may have finished already, unlocking it); this one must not write over it.
            raise TrainError(f"{out}: another amid train started in this directory while this one was loading; "
                             f"pass --resume to continue its run once it has ended, or choose another --out")
    if resume_state is None:
        if ranks.main:
            metrics_path.unlink(missing_ok=True)
        _seed_everything(cfg.seed + ranks.rank)  # rank 0 seeds as one process does; dropout differs per rank
    if ranks.main:  # the settings as given, and what they resolved to on this machine for this run
        write_json_atomic(out / "config.json", {**cfg.to_dict(), "resolved": {
            "loss": dataclasses.asdict(cfg.loss), "device": str(device), "dtype": str(amp_dtype).replace("torch.", ""),
            "loss_path": "online teacher" if teacher else "fused" if fused else "materialised",
            "total_steps": total_steps, "warmup_steps": _warmup_steps(cfg, total_steps), "world_size": ranks.world}})

    n_params = sum(p.numel() for p in params)
    log(
        f"student {cfg.student}: {n_params / 1e6:.2f}M parameters, {device} {str(amp_dtype).replace('torch.', '')}"
        f"{f' on each of {ranks.world} processes' if ranks.world > 1 else ''}, "
        f"loss {'online teacher, full vocabulary' if teacher else 'fused' if fused else 'materialised logits'}"
        f"{'' if head.plain else ' (model logits)'}"
        f"{f', evaluated against {cfg.eval_teacher} over the full vocabulary' if cfg.eval_teacher else ''}; "
        f"{plan.examples} training examples ({plan.batches_per_epoch} batches/epoch, {per_step} a step), "
        f"{sum(len(b['rows']) for b in eval_batches)} held-out positions in {len(eval_batches)} batches; "
        f"{total_steps} steps"
    )

    metrics_file = open(metrics_path, "a", encoding="utf-8") if ranks.main else None

    def write_metrics(record: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def run_eval() -> dict[str, float] | None:
        if not eval_batches:
            return None
        result = evaluate(head, eval_batches[ranks.rank::ranks.world], cfg.loss.at_progress(step / total_steps),
                          device, autocast, eval_teacher, ranks)
        write_metrics({"step": step, **{k: round(v, 6) for k, v in result.items()}})
        return result

    def save_checkpoint() -> None:
        rngs = ranks.gather(_rng_state(device))  # every rank takes part; rank 0 writes
        if not ranks.main:
            return
        save_model_dir(ckpt_dir, model, tokenizer, {
            "step": step, "tokens": tokens, "position": position.to_dict(), "total_steps": total_steps,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": rngs[0], "config": cfg.to_dict(), "amid_version": __version__, "world_size": ranks.world,
            "cache_id": cache_id, **({"lm_id": lm_id} if lm_id else {}),
            **({"rng_ranks": rngs} if ranks.world > 1 else {}),
        })

    if scaler.is_enabled():  # its scale now, not at the first scale(): a rank without batches in its first
        scaler.scale(torch.zeros((), device=device))  # step (the stream ends mid-step) still unscales
    last_saved = resume_state["step"] if resume_state is not None else None
    first_eval = run_eval() if resume_state is None else _initial_eval(out)
    last_eval, last_eval_step = first_eval, (0 if first_eval else None)
    if resume_state is not None and 0 < step < total_steps and step % cfg.eval_every == 0:
        # A stop skips the evaluation due at its step (the checkpoint comes first): make it up, so
        # that the log holds every evaluation an uninterrupted run makes. Rank 0 reads the log.
        missing = ranks.main and not any(r["step"] == step and "eval_kl" in r for r in read_metrics(metrics_path))
        if ranks.sum_numbers([int(missing)], torch.int64)[0]:
            last_eval, last_eval_step = run_eval(), step
    loader = Loader(cache, plan, pad_id, start=position, epochs=loader_epochs, num_workers=cfg.num_workers,
                    pin_memory=device.type == "cuda", rank=ranks.rank, world=ranks.world)
    stream = iter(loader)
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not cfg.progress or not ranks.main,
               dynamic_ncols=True)
    model.train()
    loss_value = float("nan")
    interval_tokens, interval_start, smooth = 0, time.time(), None
    stop = StopRequest("amid train: stopping after this step, with a checkpoint (Ctrl-C again to stop at once)"
                       if ranks.main else None)
    try:
        stop.install()
        while step < total_steps:
            group = [item for _, item in zip(range(per_step), stream)]  # (batch or None: another rank's, position)
            if not group:
                break
            mine = [(j, b) for j, (b, _) in enumerate(group) if b is not None]
            lr = learning_rate(cfg, step, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_cfg = cfg.loss.at_progress(step / total_steps)
            n_targets, step_tokens = ranks.sum_numbers(
                [sum(len(b["rows"]) for _, b in mine), sum(b["tokens"] for _, b in mine)], torch.int64)
            loss_sum = torch.zeros((), device=device)
            lm_sum = torch.zeros((), device=device)
            for j, cpu_batch in mine:
                batch = _to_device(cpu_batch, device)
                with autocast():
                    per_position = batch_loss(head, batch, loss_cfg, fused, amp_dtype, teacher)
                part = per_position.sum() / n_targets
                scaler.scale(part).backward()
                loss_sum += part.detach()
                if lm_stream is not None:  # one plain-text batch beside each cache batch, its own backward
                    lm_batch = _to_device(lm_stream.batch(step * per_step + j), device)
                    # weight 0: the LM loss is only watched (metrics), not trained
                    with autocast(), torch.set_grad_enabled(cfg.lm_weight > 0):
                        lm = batch_loss(head, lm_batch, CE, fused, amp_dtype).sum() / (
                            len(group) * lm_stream.targets_per_batch)
                    if cfg.lm_weight > 0:
                        scaler.scale(cfg.lm_weight * lm).backward()
                        loss_sum += cfg.lm_weight * lm.detach()
                    lm_sum += lm.detach()
            position = group[-1][1]
            tokens += step_tokens
            interval_tokens += step_tokens
            ranks.sum_grads(params)
            # One sync a step; it also carries a stop request (which signal, on how many ranks), so that
            # every rank stops after the same step and names the signal one of them got.
            loss_value, lm_value, *asked = ranks.sum(torch.stack([
                loss_sum, lm_sum, *(loss_sum.new_tensor(float(stop.signum == sig)) for sig in STOP_SIGNALS)])).tolist()
            stopping = sum(asked) > 0  # asked[i]: ranks that got STOP_SIGNALS[i]
            if not math.isfinite(loss_value):
                raise TrainingDiverged(_diverged_message("loss", loss_value, step + 1, last_saved, ckpt_dir))
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip else float("inf")).item()
            if not math.isfinite(grad_norm) and not scaler.is_enabled():
                raise TrainingDiverged(_diverged_message("gradient norm", grad_norm, step + 1, last_saved, ckpt_dir))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            smooth = loss_value if smooth is None else 0.9 * smooth + 0.1 * loss_value
            if step % cfg.log_every == 0 or step == total_steps or stopping:
                elapsed = max(time.time() - interval_start, 1e-9)
                record = {"step": step, "epoch": round(position.epoch + _epoch_fraction(plan, position), 4),
                          "loss": loss_value, "lr": lr, "grad_norm": round(grad_norm, 6),
                          "tokens": tokens, "tokens_per_s": round(interval_tokens / elapsed, 1)}
                if lm_stream is not None:
                    record["lm_loss"] = lm_value
                if cfg.loss.lam_end is not None:
                    record["lam"] = loss_cfg.lam
                write_metrics(record)
                bar.set_postfix(loss=f"{smooth:.4f}", tok_s=f"{interval_tokens / elapsed:,.0f}", refresh=False)
                interval_tokens, interval_start = 0, time.time()
            bar.update(1)
            if step % cfg.eval_every == 0 and step < total_steps and not stopping:  # the checkpoint comes first
                last_eval, last_eval_step = run_eval(), step
            if (step % cfg.save_every == 0 or stopping) and step < total_steps and last_saved != step:
                save_checkpoint()
                last_saved = step
            if stopping and step < total_steps:
                ranks.barrier()  # no rank exits (and has torchrun end the others) before the checkpoint is written
                signum = stop.signum or next(sig for sig, n in zip(STOP_SIGNALS, asked) if n)  # another rank's
                raise Interrupted(f"{signal_name(signum)} at step {step} of {total_steps}: "
                                  f"checkpoint saved in {ckpt_dir}; continue with the same command and --resume",
                                  signum)
        if last_eval_step != step:
            last_eval = run_eval()
    except Interrupted:
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of this step
        kept = (f"the checkpoint of step {last_saved} in {ckpt_dir} is kept" if last_saved
                else "no checkpoint was saved yet (--resume starts again from step 0)")
        raise Interrupted(f"stopped at once at step {step} of {total_steps}: {kept}; continue with the same "
                          f"command and --resume") from None
    finally:
        stop.restore()
        bar.close()
        loader.close()
        if metrics_file is not None:
            metrics_file.close()

    if last_saved != step:
        save_checkpoint()
    if ranks.main:
        save_model_dir(out / "final", model, tokenizer)
    summary = {
        "run_dir": str(out), "final": str(out / "final"), "steps": step, "total_steps": total_steps,
        "train_tokens": tokens, "train_loss": loss_value, **(last_eval or {}),
        "initial_eval": first_eval, "eval": last_eval, "wall_s": round(time.time() - start_time, 3),
        "world_size": ranks.world,
    }
    if ranks.main:
        write_json_atomic(out / "summary.json", summary)
    ranks.barrier()  # no rank returns before final/ and summary.json exist
    if last_eval:
        full = f", eval_kl_full {last_eval['eval_kl_full']:.4f}" if "eval_kl_full" in last_eval else ""
        log(f"done: {step} steps, eval_kl {last_eval['eval_kl']:.4f}{full}, eval_ppl {last_eval['eval_ppl']:.4g}; "
            f"model in {out / 'final'}")
    else:  # nothing held out (--eval-fraction 0)
        log(f"done: {step} steps, train loss {loss_value:.4f} (no held-out evaluation); model in {out / 'final'}")
    return summary


def _summary_of_step(path: Path, step: int) -> dict[str, Any] | None:
    """The run's summary.json if it describes the run at `step` (its checkpoint), else None."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("steps") == step else None


def _rebuilt_summary(out: Path, state: dict[str, Any], total_steps: int, world: int) -> dict[str, Any]:
    """The summary of a run killed after its last checkpoint, from its metrics log (the last
    evaluation is logged before that checkpoint is written): values as logged, wall_s unknown."""
    records = read_metrics(out / "metrics.jsonl")

    def values(record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if k != "step"}

    evals = [r for r in records if "eval_kl" in r]
    first = _initial_eval(out, records)
    last = values(evals[-1]) if evals and evals[-1]["step"] == state["step"] else None
    losses = [r["loss"] for r in records if "loss" in r]
    return {
        "run_dir": str(out), "final": str(out / "final"), "steps": state["step"], "total_steps": total_steps,
        "train_tokens": state["tokens"], "train_loss": losses[-1] if losses else float("nan"), **(last or {}),
        "initial_eval": first, "eval": last, "wall_s": None, "world_size": world,
    }


def _initial_eval(out: Path, records: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The step-0 evaluation a resumed run made before its first step, from its metrics log."""
    records = read_metrics(out / "metrics.jsonl") if records is None else records
    return next(({k: v for k, v in r.items() if k != "step"} for r in records if r["step"] == 0 and "eval_kl" in r),
                None)


def _epoch_fraction(plan: Plan, pos: Position) -> float:
    windows = plan.epoch(pos.epoch)
    done = sum(len(b) for _, b in windows[: pos.window]) + pos.batch
    return done / max(1, plan.batches_per_epoch)


def _diverged_message(what: str, value: float, step: int, last_saved: int | None, ckpt_dir: Path) -> str:
    kept = (f"the last good checkpoint is {ckpt_dir} (step {last_saved})" if last_saved is not None
            else "no checkpoint had been saved yet")
    return (f"{what} is {value} at step {step}; stopped before updating the weights, {kept}. "
            f"Lower --lr, use --dtype bf16/fp32 or --clip, then --resume")

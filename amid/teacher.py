"""Stage one: run the teacher over a dataset once and write its top-k distribution to a cache.

`cache_teacher(CacheConfig(...))` tokenizes the data (refusing bad input before any output is
written), splits the examples into fixed shard tasks, and for every task not yet finished runs
the teacher batch by batch and writes one shard atomically. A killed run resumes at the first
unfinished task; each example ends up in exactly one shard. With several processes under
torchrun/accelerate (RANK/WORLD_SIZE set), rank r takes tasks r, r + W, ...; whichever rank
finishes last merges the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from amid import __version__
from amid.bins import eager_logit_stats
from amid.cache import (
    MANIFEST, CacheError, Progress, ShardWriter, existing_header, finalize, finished_shards, foreign_entries,
    make_header, mismatch_message, progress_name, temporary_files,
)
from amid.data import DataError, Example, TemplateConfig, build_examples, iter_batches, load_records, where
from amid.distributed import world_from_env
from amid.heads import TargetLogits, context_length
from amid.lock import DirLock
from amid.models import ModelError, load_model, load_tokenizer, model_context, resolve_model
from amid.paths import same_path
from amid.placement import need_accelerate, process_gpus, spread_device_map
from amid.loader import pad_examples

__all__ = ["CacheConfig", "cache_teacher", "tokenizer_identity", "model_identity", "teacher_topk", "resolve_device",
           "resolve_dtype"]


@dataclass(frozen=True)
class CacheConfig:
    """Everything `amid cache-teacher` needs. Saved in the manifest."""

    teacher: str
    data: str
    out: str
    top_k: int = 64
    max_length: int = 1024
    batch_size: int = 16
    max_tokens: int = 16384  # per forward batch, padded tokens counted
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    device: str = "auto"
    device_map: str | None = None  # "auto": the teacher's layers spread over this process's GPUs (amid.placement)
    temperature: float = 1.0
    template: str = "auto"
    prompt_field: str = "prompt"
    response_field: str = "response"
    text_field: str = "text"
    messages_field: str = "messages"
    chat_template_kwargs: dict[str, Any] | None = None  # --template chat: the template's own arguments
    chat_turns: str = "all"  # --template chat: every assistant turn a target, or the "last" of each conversation
    split: str = "train"
    limit: int | None = None
    overflow: str = "error"
    examples_per_shard: int = 2048
    # Also bounds a shard's decoded size (positions × k × 12 bytes: 200 MB at k = 64) for long texts.
    positions_per_shard: int = 262_144
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {self.top_k}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"--temperature must be positive and finite, got {self.temperature}")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"--dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        if self.device_map not in (None, "auto"):
            raise ValueError(f"--device-map must be auto, got {self.device_map!r}")
        if self.device_map and self.device != "auto":
            raise ValueError(f"--device {self.device} and --device-map auto: pass one (--device-map picks the GPUs)")
        if min(self.batch_size, self.max_tokens, self.examples_per_shard, self.positions_per_shard) < 1:
            raise ValueError("--batch-size, --max-tokens, --examples-per-shard and --positions-per-shard must be "
                             "positive")

    def template_config(self) -> TemplateConfig:
        return TemplateConfig(
            template=self.template, prompt_field=self.prompt_field, response_field=self.response_field,
            messages_field=self.messages_field, chat_template_kwargs=self.chat_template_kwargs,
            chat_turns=self.chat_turns,
            text_field=self.text_field, max_length=self.max_length, overflow=self.overflow,
        )


# ----------------------------------------------------------------------------------------------
# Identities: what makes a cache usable with a given student


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """A tokenizer's identity by content, not name: hash of its vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = {k: v for k, v in sorted(tokenizer.special_tokens_map.items()) if isinstance(v, str)}
    digest = hashlib.sha256(json.dumps([vocab, specials], ensure_ascii=False).encode()).hexdigest()
    return {"vocab_sha256": digest, "vocab_size": len(vocab), "special_tokens": specials}


def model_identity(name_or_path: str, model) -> dict[str, Any]:
    """Teacher identity: name/path, hub revision if any, hash of the local weight files."""
    ident: dict[str, Any] = {"name_or_path": name_or_path}
    revision = getattr(model.config, "_commit_hash", None)
    if revision:
        ident["revision"] = revision
    path = Path(name_or_path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
        ident["weights_sha256"] = h.hexdigest()
    ident["config"] = architecture(model)
    return ident


def _same_spelling(mine: str, theirs: Any, same_content: bool) -> str:
    """`theirs` where both name one existing file or directory (relative vs absolute, a symlink),
    or where the contents they name hash the same (a relative path given from another directory,
    a copy of the teacher): the cache's identity keeps the spelling it was started with. The
    contents are compared by hash (weights, tokenized examples) either way."""
    return theirs if isinstance(theirs, str) and (same_content or same_path(mine, theirs)) else mine


def architecture(model) -> dict[str, Any]:
    """The model's config as the manifest records it (JSON types): the architecture, not how it
    was loaded (the dtype the forward runs in is recorded separately)."""
    config = {k: v for k, v in model.config.to_diff_dict().items()
              if not k.startswith("_") and k not in ("dtype", "torch_dtype")}
    return json.loads(json.dumps(config, default=str))


# ----------------------------------------------------------------------------------------------
# The teacher's top-k


@torch.no_grad()
def teacher_topk(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """Top-k log-probabilities and exact tail log-mass of rows of logits.

    Args:
        logits: [P, V] any float dtype.
    Returns:
        (ids [P, k] int64, logprobs [P, k] float32, tail_logmass [P] float32), all computed in
        float32 from the full logits; the tail is a logsumexp over the complement of the top-k
        (−inf when k ≥ V). The statistics are the student side's (`amid.bins`), so the cache's
        bins and the student's are one definition, computed in cache-sized chunks.
    """
    z = logits.to(torch.float32, copy=temperature != 1.0)
    if temperature != 1.0:
        z.div_(temperature)
    ids = torch.topk(z, min(k, z.shape[-1]), dim=-1).indices
    stats = eager_logit_stats(z, ids, None, torch.float32)
    return ids, stats.log_q_s, stats.log_q_tail


def resolve_device(device: str) -> torch.device:
    """"auto": this process's GPU (LOCAL_RANK under torchrun) if there is one, else the CPU.
    ValueError for a device this machine does not have (torch would fail later, deep inside)."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # Under torchrun/accelerate each process takes its own GPU.
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    try:
        chosen = torch.device(device)
    except RuntimeError:  # torch's own message lists every device type it knows
        raise ValueError(f"--device {device}: not a device; use cpu, cuda, cuda:N or auto") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: this machine (or this torch build, {torch.__version__}) has no CUDA "
                             f"device; use --device cpu or auto")
        if chosen.index is not None and chosen.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return chosen


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto": bf16 (fp16 without bf16 support) on GPU, fp32 on CPU; else bf16/fp16/fp32 as named."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def cache_teacher(cfg: CacheConfig, progress: bool = True, log=print) -> dict[str, Any]:
    """Run stage one. Returns the manifest (dict) once the cache is complete.

    Raises DataError for bad data and CacheError for an output directory that holds another
    cache, or one that another cache-teacher is writing (a lock per rank, amid.lock); in both
    cases nothing is written.
    """
    rank, _, world = world_from_env()
    out = Path(cfg.out)
    lock = DirLock(out, f".lock-rank{rank}", busy=lambda: CacheError(
        f"{out}: another amid cache-teacher is writing this cache{f' as rank {rank}' if world > 1 else ''}; "
        f"wait for it to end (or stop it), then rerun to finish what it left"))
    try:
        if any(out.glob("progress-rank*.json")):  # a cache being written: before the teacher loads (next to
            lock.take()                           # a running job it could run out of memory first)
        return _cache_teacher(cfg, progress, log, lock, rank, world)
    finally:
        lock.release()


def _writer_alive(temporary: Path) -> bool:
    """Whether the process that names a temporary shard file (`.NAME.tmp-PID`) runs on this host
    (another host's PID may match a local one: its stale file then stays, which costs nothing)."""
    pid = temporary.name.rsplit(".tmp-", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _cache_teacher(cfg: CacheConfig, progress, log, lock: DirLock, rank: int, world: int) -> dict[str, Any]:
    start = time.time()
    out = Path(cfg.out)
    if cfg.device_map:
        need_accelerate()  # before the data is read, which may take minutes
    tokenizer = load_tokenizer(cfg.teacher, "--teacher", cfg.trust_remote_code)
    records = load_records(cfg.data, split=cfg.split, limit=cfg.limit)
    # The teacher's context from its config (its weights load after the data is checked): for hints.
    examples, stats, template = build_examples(records, tokenizer, cfg.template_config(), cfg.data,
                                               model_context(cfg.teacher, cfg.trust_remote_code))
    if rank == 0:
        _data_notes(cfg, stats, template, log)

    if cfg.device_map:  # a teacher larger than one GPU: its layers over this process's GPUs
        _, local_rank, _ = world_from_env()
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        gpus = process_gpus(torch.cuda.device_count() if torch.cuda.is_available() else 0, local_rank, processes)
        if gpus:  # this process's "cuda" (bf16 support, stray allocations): its own first GPU, not cuda:0
            torch.cuda.set_device(gpus[0])
        dtype = resolve_dtype(cfg.dtype, torch.device("cuda" if gpus else "cpu"))
        try:
            device_map = spread_device_map(cfg.teacher, "--teacher", cfg.trust_remote_code, dtype, gpus,
                                           processes=processes)
        except ModelError as exc:  # each rank plans for its own GPUs
            exc.this_rank_only = True
            raise
        model = load_model(cfg.teacher, "--teacher", cfg.trust_remote_code, dtype=dtype, device_map=device_map).eval()
        device = model.get_input_embeddings().weight.device  # where a batch goes in
        places = [f"cuda:{d}" if isinstance(d, int) else str(d) for d in dict.fromkeys(device_map.values())]
        runs_on = f"{', '.join(places)} (--device-map auto)"
    else:
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        model = load_model(cfg.teacher, "--teacher", cfg.trust_remote_code, dtype=dtype).to(device).eval()
        runs_on = str(device)
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise DataError(f"{cfg.teacher}: the model has no LM head (get_output_embeddings() gives "
                        f"{type(head).__name__}); cache-teacher needs a causal LM that outputs logits")
    vocab_size = int(head.weight.shape[0])
    context = context_length(model)
    longest = max(examples, key=lambda e: len(e.input_ids))
    if context and len(longest.input_ids) > context:
        turn = f" (its assistant turn {longest.turn + 1})" if longest.turn else ""  # of a split conversation
        raise DataError(
            f"{where(records, longest.record, cfg.data)}: the example{turn} has {len(longest.input_ids)} tokens, "
            f"more than the teacher's context of {context}; pass --max-length {context} (with --overflow "
            f"truncate or skip)"
        )
    if cfg.top_k > vocab_size and rank == 0:
        log(f"note: --top-k {cfg.top_k} is more than the teacher's {vocab_size} output logits: every token is "
            f"cached (k = {vocab_size}, no tail)")
    if vocab_size < len(tokenizer):
        raise DataError(
            f"{cfg.teacher}: model has {vocab_size} output logits but its tokenizer {len(tokenizer)} tokens"
        )
    data_ident = {
        "source": cfg.data, "split": cfg.split, "limit": cfg.limit, "template": template,
        "fields": {"prompt": cfg.prompt_field, "response": cfg.response_field, "text": cfg.text_field,
                   # only where used: caches of other data keep the identity they always had
                   **({"messages": cfg.messages_field} if template == "chat" and cfg.messages_field in records[0]
                      else {})},
        # Only where set and used: caches made without keep the identity they always had.
        **(cfg.template_config().chat_settings() if template == "chat" else {}),
        "max_length": cfg.max_length, "overflow": cfg.overflow, "records": stats.records,
        "examples_per_shard": cfg.examples_per_shard, "positions_per_shard": cfg.positions_per_shard,
        # The content, not just the file name: resuming over edited data must be refused.
        "examples_sha256": _examples_digest(examples),
    }
    logits = TargetLogits(model)
    # How the values were computed belongs to the identity: a resume with another --dtype (or by an
    # amid that computes the head differently) must not mix its shards with these.
    teacher_dtype = str(dtype).replace("torch.", "")
    teacher_dir = resolve_model(cfg.teacher)  # a run directory: the model in it
    teacher_ident = {**model_identity(teacher_dir, model), "dtype": teacher_dtype, "logits": logits.mode}
    # Foreign entries are listed before the header is read: under torchrun another rank may create
    # its first progress file in between, and an entry that appears after must not look foreign.
    foreign = foreign_entries(out)
    old = existing_header(out) if out.exists() else None
    if old is not None:  # a rerun may spell the same data file or teacher directory another way
        old_data, old_teacher = old.get("data") or {}, old.get("teacher") or {}
        data_ident["source"] = _same_spelling(
            data_ident["source"], old_data.get("source"), old_data.get("examples_sha256") == data_ident["examples_sha256"])
        weights = teacher_ident.get("weights_sha256")
        # Equal weights are the same teacher unless model code travels with them (trust_remote_code:
        # its modeling_*.py is not hashed), and a hash of no files says nothing.
        own_code = any(Path(teacher_dir).glob("*.py"))
        teacher_ident["name_or_path"] = _same_spelling(
            teacher_ident["name_or_path"], old_teacher.get("name_or_path"),
            not own_code and weights not in (None, hashlib.sha256().hexdigest())
            and old_teacher.get("weights_sha256") == weights)
    header = make_header(
        teacher=teacher_ident, tokenizer=tokenizer_identity(tokenizer), k=min(cfg.top_k, vocab_size),
        temperature=cfg.temperature, data=data_ident, vocab_size=vocab_size,
    )
    header["config"] = dataclasses.asdict(cfg)
    header["amid_version"] = __version__
    header["teacher_dtype"] = teacher_dtype
    header["teacher_logits"] = logits.mode
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    if old is not None and old.get("fingerprint") != header["fingerprint"]:
        raise CacheError(mismatch_message(out, old, header))
    if old is not None and (out / MANIFEST).exists():
        log(f"{out}: cache already complete; nothing to do")
        return json.loads((out / MANIFEST).read_text())
    inside = [f for f in foreign if "/" in f]  # a file in examples/ or topk/ that is no shard: readers mix it in
    if old is not None and inside:
        raise CacheError(f"{out / inside[0]}: not a file of this cache (its examples/ and topk/ hold only its shards); "
                         f"move it out and rerun")
    if old is None and foreign:
        raise CacheError(f"{out}: exists and is not an amid cache (it holds {', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new --out directory")
    out.mkdir(parents=True, exist_ok=True)
    # A new directory is locked once made; before the temporaries below are removed, which with the
    # same command still running would be its own.
    lock.take()
    for stale, task in temporary_files(out):  # left by a killed writer; never visible as a shard
        # Only this rank's tasks: another rank may be writing one of its shards right now; and not
        # a live process's (a job of another world size on this --out, which the lock cannot see).
        if (task is None or task % world == rank) and not _writer_alive(stale):
            stale.unlink(missing_ok=True)
    for stale in out.glob(f".{progress_name(rank)}.tmp-*"):  # this rank's progress file, killed mid-write
        stale.unlink(missing_ok=True)

    state = Progress(out, rank, header)
    state.save()  # from now on the directory is recognisably this cache, even before its first shard
    k = header["k"]
    tasks = shard_tasks(examples, cfg.examples_per_shard, cfg.positions_per_shard)
    finished = finished_shards(out, header)  # by any rank: a resume may use another world size
    mine = [t for t in range(len(tasks)) if t % world == rank and t not in finished]
    todo_positions = sum(len(e.positions) for t in mine for e in tasks[t])
    total_positions = sum(len(e.positions) for e in examples)
    if rank == 0:
        log(f"amid cache-teacher: {len(examples)} examples, {total_positions} target positions, "
            f"{len(tasks)} shards ({len(finished)} already done), k={k}, teacher {dtype} on {runs_on} "
            f"(logits: {header['teacher_logits']})")
    bar = tqdm(total=todo_positions, unit="pos", unit_scale=True, disable=not progress, desc="caching", dynamic_ncols=True)
    try:
        for task in mine:
            writer = ShardWriter(out, task, vocab_size, k)
            for batch in iter_batches(tasks[task], cfg.max_tokens, cfg.batch_size):
                named = _forward(logits, batch, k, cfg.temperature, device, pad, lambda e: where(records, e.record, cfg.data))
                for ex, (ids, lps, tail) in zip(batch, named):
                    writer.add(ex.example_id, ex.input_ids, ex.positions, ids, lps, tail)
                bar.update(sum(len(e.positions) for e in batch))
            state.add(writer.close())
    except (CacheError, DataError, ValueError) as exc:
        exc.this_rank_only = True  # met on this rank's shards alone: the CLI reports it on every rank
        raise
    bar.close()

    counts = {"records": stats.records, "truncated": stats.truncated,
              "skipped_too_long": stats.skipped_too_long, "skipped_no_target": stats.skipped_empty,
              "split_conversations": stats.split_conversations}
    manifest = finalize(out, header, len(tasks), {"counts": counts, "wall_seconds_last_run": round(time.time() - start, 3)})
    if manifest is None:
        log(f"rank {rank}: my shards are done; the manifest is written by the last rank to finish")
        return header
    if world == 1:  # a killed run's manifest temporary (under torchrun another rank may be writing its own)
        for stale in out.glob(f".{MANIFEST}.tmp-*"):
            stale.unlink(missing_ok=True)
    c = manifest["counts"]
    log(
        f"cache complete: {out}\n"
        f"  examples {c['examples']}  target positions {c['positions']}  "
        f"(truncated {c['truncated']}, skipped too long {c['skipped_too_long']}, no target {c['skipped_no_target']})\n"
        f"  {c['bytes'] / 1e6:.2f} MB, {c['bytes_per_position']:.1f} B/position, "
        f"mean tail mass {c['mean_tail_mass']:.4f}, wall {time.time() - start:.1f} s"
    )
    return manifest


def shard_tasks(examples: list[Example], max_examples: int, max_positions: int) -> list[list[Example]]:
    """Consecutive groups of examples, one per shard: at most `max_examples` examples and at most
    `max_positions` target positions each (an example longer than that gets a shard of its own)."""
    tasks: list[list[Example]] = []
    current: list[Example] = []
    positions = 0
    for e in examples:
        if current and (len(current) == max_examples or positions + len(e.positions) > max_positions):
            tasks.append(current)
            current, positions = [], 0
        current.append(e)
        positions += len(e.positions)
    if current:
        tasks.append(current)
    return tasks


def _examples_digest(examples: list[Example]) -> str:
    """sha256 of every example's id, tokens and target positions, in order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(np.array([e.example_id, len(e.input_ids), len(e.positions)], np.int64).tobytes())
        h.update(np.asarray(e.input_ids, np.int64).tobytes())
        h.update(np.asarray(e.positions, np.int64).tobytes())
    return h.hexdigest()


@torch.no_grad()
def _data_notes(cfg: CacheConfig, stats, template: str, log) -> None:
    """What build_examples did that a user should know: records skipped, conversations split,
    answers closed by hand, chat settings without effect."""
    if stats.skipped_empty:
        what = (f"{stats.skipped_empty} examples (records, or turns of split conversations)" if stats.split_conversations
                else f"{stats.skipped_empty} of {stats.records} records")
        log(f"note: {what} have no target token (an empty response or text, or a prompt that fills --max-length) and "
            f"are skipped; the first: {stats.first_empty}")
    if stats.split_conversations:
        log(f"note: the chat template renders the earlier turns of {stats.split_conversations} conversations "
            f"differently once more turns follow (Qwen3's drops their <think> blocks and opens only the last turn with "
            f"an empty one); each of their assistant turns is an example of its own, the conversation up to it as "
            f"context (--chat-turns last: only the last answer); the first: {stats.first_split}")
    if stats.loose_answers:
        log(f"note: {stats.loose_answers} answers follow a generation prompt that the chat template renders otherwise "
            f"once the answer is added (reasoning in an answer under enable_thinking false, a rewritten prompt): each "
            f"is the answer as written after the prompt, closed by the template's end of turn; the first: "
            f"{stats.first_loose}")
    if template != "chat" and cfg.template_config().chat_settings():
        log(f"note: --chat-template-kwargs / --chat-turns apply to the chat template only; template {template} "
            f"ignores them")


def _forward(logits: TargetLogits, batch: list[Example], k: int, temperature: float, device: torch.device, pad: int,
             where_is: Callable[[Example], str]):
    """Yield (ids, logprobs, tail) as NumPy arrays per example of a right-padded batch.
    `where_is` names an example's record (FILE:LINE) in an error."""
    # Every target row of the batch at once: one top-k per chunk, one device-to-host copy per batch.
    step = max(1, (1 << 26) // logits.route.head.weight.shape[0])  # ≤ 256 MiB of float32 logits a chunk
    parts = [teacher_topk(z, k, temperature) for z in logits.chunks(pad_examples(batch, pad, device), step)]
    ids, lps, tail = (torch.cat(p).cpu().numpy() for p in zip(*parts))  # int64, float32, float32
    bad = np.flatnonzero(np.isnan(lps).any(axis=1) | np.isnan(tail))
    if len(bad):  # a broken teacher must not leave a cache of NaN behind, nor a silent tail of 0
        example = batch[int(np.searchsorted(np.cumsum([len(e.positions) for e in batch]), bad[0], side="right"))]
        raise CacheError(
            f"{where_is(example)}: the teacher's logits are NaN at {len(bad)} target position(s) of a batch, the "
            f"first in this record; check the teacher's weights, or its --dtype (fp16 overflows "
            f"in many models: use bf16 or fp32)"
        )
    start = 0
    for e in batch:
        end = start + len(e.positions)
        yield ids[start:end], lps[start:end], tail[start:end]
        start = end

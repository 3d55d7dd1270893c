"""Training batches from a teacher cache: held-out split, seeded plan, background reading.

The order of batches is a pure function of the cache's metadata and the seed, decided before any
top-k data is read:

- `scan` reads only each shard's `example_id`, `input_ids` and `positions` columns (lengths).
- `split` holds out evaluation examples by a hash of their record (`record_of(example_id)`:
  stable across runs, seeds and shard layouts; the turns of a conversation split into several
  examples fall on the same side).
- `Plan` cuts every epoch into *windows*: the shards in a seeded order, grouped until a window
  holds at least `shuffle_buffer` training examples or `window_tokens` tokens (long sequences:
  the loader's memory follows tokens, not examples). A window's examples are shuffled, sorted by
  length inside pools of ~64 batches (little padding), cut into batches (a number of sequences,
  or a budget of padded tokens) and the batches shuffled again.
- `Loader` reads a window's shards (checksums verified, in `num_workers` threads, the next
  window while the current one is served) and collates batches in a background thread. Under
  data parallelism (`world` ranks) every rank walks the same stream but decodes and collates only
  the examples of its own batches: the i-th batch from the start belongs to rank i mod world.

A position in the stream is `Position(epoch, window, batch)`: the next batch to serve. Every
batch carries the position after it, which is what a checkpoint stores; a resumed loader starts
there and reads only that window.

`LMStream` serves the optional plain language-modelling batches (fixed-length blocks of text):
batch i is a pure function of i and the seed, so resuming needs nothing but the step.
"""

from __future__ import annotations

import math
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from amid.cache import Cache, CacheError
from amid.data import cut_batches, record_of

__all__ = ["ShardMeta", "Position", "Plan", "Loader", "LMStream", "scan", "split", "pad_right", "target_rows",
           "pad_examples", "collate",
           "POOL_BATCHES"]

POOL_BATCHES = 64  # length sorting happens inside pools of this many batches


@dataclass
class ShardMeta:
    """Per-example metadata of one shard, in the shard's row order."""

    example_ids: np.ndarray  # [n] int64
    lengths: np.ndarray  # [n] tokens per example


def scan(cache: Cache) -> list[ShardMeta]:
    """Ids and lengths of every example, reading only two small columns of each shard (the
    checksums are verified when the loader reads the whole shard)."""
    metas = []
    for i in range(len(cache.shards)):
        f = cache.shard_path(i, "examples")
        try:
            table = pq.read_table(f, columns=["example_id", "input_ids"])
        except (OSError, ValueError) as exc:  # missing file, not Parquet (ArrowInvalid is a ValueError)
            raise CacheError(f"shard {f}: cannot be read ({exc}); the cache is damaged, recreate it") from None
        metas.append(
            ShardMeta(
                example_ids=table.column("example_id").to_numpy().astype(np.int64),
                lengths=pc.list_value_length(table.column("input_ids")).to_numpy().astype(np.int64),
            )
        )
    return metas


def _unit_hash(example_ids: np.ndarray) -> np.ndarray:
    """splitmix64 of each id mapped to [0, 1): a fixed pseudo-random number per example."""
    z = example_ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split(metas: list[ShardMeta], fraction: float, cap: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(training rows, evaluation rows) of each shard, chosen by a hash of each example's record.

    Examples whose hash is below `fraction` are held out (at least one if fraction > 0): never
    trained on. The evaluation set is the `cap` of them with the lowest hashes. The choice is
    stable across runs, seeds and shard layouts.
    """
    hashes = [_unit_hash(record_of(m.example_ids)) for m in metas]
    everything = np.concatenate(hashes) if hashes else np.zeros(0)
    if fraction <= 0 or len(everything) == 0:
        return [np.arange(len(h)) for h in hashes], [np.zeros(0, np.int64) for _ in hashes]
    threshold = max(fraction, float(np.nextafter(everything.min(), 2.0)))
    limit = np.sort(everything[everything < threshold])[:cap][-1]
    return [np.nonzero(h >= threshold)[0] for h in hashes], [np.nonzero(h <= limit)[0] for h in hashes]


@dataclass(frozen=True)
class Position:
    """Where the stream is: the next batch to serve is batch `batch` of window `window` of `epoch`."""

    epoch: int = 0
    window: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


Batch = list[tuple[int, int]]  # (shard index, row in shard) per sequence


class Plan:
    """Which examples form which batch, for every epoch, from metadata and the seed only."""

    def __init__(
        self,
        metas: list[ShardMeta],
        rows: list[np.ndarray],
        seed: int,
        batch_size: int,
        max_tokens: int | None,
        shuffle_buffer: int,
        window_tokens: int | None = None,
    ):
        """`rows[s]`: the rows of shard s that are used for training. A window closes at the first
        shard that brings it to `shuffle_buffer` examples or `window_tokens` tokens (None: no
        token bound); it always holds whole shards."""
        self.metas = metas
        self.rows = rows
        self.seed = seed
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        # Batches are a number of sequences, or (with max_tokens) a budget of padded tokens.
        self._batch_limit = None if max_tokens else batch_size
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.window_tokens = window_tokens
        self._cache: dict[int, list[tuple[list[int], list[Batch]]]] = {}
        self.examples = int(sum(len(r) for r in rows))
        self.batches_per_epoch = sum(len(b) for _, b in self.epoch(0))

    def epoch(self, epoch: int) -> list[tuple[list[int], list[Batch]]]:
        """The windows of an epoch: (shards to read, batches), in serving order."""
        # Called from the producer thread and the main thread: read the dict once, swap it whole.
        cache = self._cache
        plan = cache.get(epoch)
        if plan is None:
            plan = self._make_epoch(epoch)
            # Keep two epochs (the producer looks one ahead at an epoch's end): plans can be large.
            self._cache = {**{e: p for e, p in cache.items() if e == epoch - 1}, epoch: plan}
        return plan

    def _make_epoch(self, epoch: int) -> list[tuple[list[int], list[Batch]]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.metas))
        windows, current, count, tokens = [], [], 0, 0
        token_cap = self.window_tokens if self.window_tokens is not None else math.inf
        for s in order:
            if len(self.rows[s]) == 0:
                continue
            current.append(int(s))
            count += len(self.rows[s])
            tokens += int(self.metas[s].lengths[self.rows[s]].sum())
            if count >= self.shuffle_buffer or tokens >= token_cap:
                windows.append(current)
                current, count, tokens = [], 0, 0
        if current:
            windows.append(current)
        return [(shards, self._window_batches(shards, epoch, w)) for w, shards in enumerate(windows)]

    def _window_batches(self, shards: list[int], epoch: int, window: int) -> list[Batch]:
        rng = np.random.default_rng([self.seed, epoch, window, 1])
        items = np.concatenate([np.stack([np.full(len(self.rows[s]), s), self.rows[s]], 1) for s in shards])
        lengths = np.concatenate([self.metas[s].lengths[self.rows[s]] for s in shards])
        shuffle = rng.permutation(len(items))
        items, lengths = items[shuffle], lengths[shuffle]
        if self.max_tokens is None:
            pool = POOL_BATCHES * self.batch_size
        else:
            pool = max(1, POOL_BATCHES * self.max_tokens // max(1, int(lengths.mean())))
        batches: list[Batch] = []
        for start in range(0, len(items), pool):
            chunk = slice(start, start + pool)
            order = np.argsort(lengths[chunk], kind="stable")
            sorted_items = [(int(s), int(r)) for s, r in items[chunk][order]]
            sorted_lengths = lengths[chunk][order].tolist()
            batches.extend(cut_batches(sorted_items, sorted_lengths, self._batch_limit, self.max_tokens))
        return [batches[i] for i in rng.permutation(len(batches))]

    def after(self, pos: Position) -> Position:
        """The position following `pos` (which must name a batch that exists)."""
        windows = self.epoch(pos.epoch)
        if pos.batch + 1 < len(windows[pos.window][1]):
            return Position(pos.epoch, pos.window, pos.batch + 1)
        if pos.window + 1 < len(windows):
            return Position(pos.epoch, pos.window + 1, 0)
        return Position(pos.epoch + 1, 0, 0)


def pad_right(sequences: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, T] int64 input_ids and attention_mask of token sequences (lists or tensors)."""
    seqs = [torch.as_tensor(x, dtype=torch.long) for x in sequences]
    lengths = torch.tensor([x.shape[0] for x in seqs])
    longest = int(lengths.max()) if len(seqs) else 0
    mask = torch.arange(longest)[None, :] < lengths[:, None]
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    input_ids[mask] = torch.cat(seqs) if seqs else input_ids[mask]  # row-major: each row's prefix, in order
    return input_ids, mask.long()


def target_rows(positions: list[torch.Tensor], width: int) -> torch.Tensor:
    """[N] rows b·width + t of the flattened [B, width] logits for every position t of sequence b."""
    counts = torch.tensor([p.shape[0] for p in positions])
    return torch.cat(positions) + torch.repeat_interleave(torch.arange(len(positions)) * width, counts)


def pad_examples(examples: list, pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A right-padded batch of tokenized examples (`amid.data.Example`: input_ids, positions) on
    `device`: input_ids, attention_mask [B, T] and rows [N] (b·T + t of every target position,
    example by example)."""
    input_ids, mask = pad_right([e.input_ids for e in examples], pad_id)
    rows = target_rows([torch.as_tensor(e.positions, dtype=torch.long) for e in examples], input_ids.shape[1])
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "rows": rows.to(device)}


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded inputs and the flattened target rows of a list of cache examples.

    Returns input_ids / attention_mask [B, T]; rows [N] (b·T + t of each target position t,
    whose logits predict input_ids[b, t + 1]); targets [N]; topk_ids / topk_logprobs [N, k];
    tail_logmass [N]; tokens (real, unpadded tokens in the batch).
    """
    input_ids, mask = pad_right([e["input_ids"] for e in examples], pad_id)
    longest = input_ids.shape[1]
    rows_t = target_rows([e["positions"] for e in examples], longest)
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "rows": rows_t,
        "targets": input_ids.view(-1)[rows_t + 1],
        "topk_ids": torch.cat([e["topk_ids"] for e in examples]).long(),  # widened here if stored compact
        "topk_logprobs": torch.cat([e["topk_logprobs"] for e in examples]).float(),
        "tail_logmass": torch.cat([e["tail_logmass"] for e in examples]),
        "tokens": int(mask.sum()),
    }


_DONE = object()


class Loader:
    """Serves the plan's batches from `start` on, collated, from a background thread.

    Iterating yields (batch dict, position after the batch); it runs through `epochs` epochs
    (None: forever). Reading errors (a damaged shard) are raised in the consumer. With
    `world` > 1 it yields every batch of the stream, but the dict only for this `rank`'s (the
    i-th from `start` is rank i mod world's) and None for the others', so that every rank knows
    where the stream is and how many batches a step has.
    """

    def __init__(
        self,
        cache: Cache,
        plan: Plan,
        pad_id: int,
        start: Position = Position(),
        epochs: int | None = None,
        num_workers: int = 2,
        prefetch: int = 8,
        pin_memory: bool = False,
        rank: int = 0,
        world: int = 1,
    ):
        self.cache = cache
        self.plan = plan
        self.pad_id = pad_id
        self.start = start
        self.epochs = epochs
        self.pin_memory = pin_memory
        self.rank, self.world = rank, world
        self._pool = ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="amid-read")
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch) * world)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="amid-loader", daemon=True)
        self._thread.start()

    def _read_window(self, shards: list[int], batches: list[Batch], first: int, served: int) -> dict[int, Future]:
        """Start reading what this rank collates of a window: the examples of its batches from
        `first` on, the `served`-th of the stream being the window's batch `first`."""
        # Compact examples (int32 ids, float16 log-probs): a window in memory costs half as much.
        if self.world == 1:  # nearly every row: decoding whole shards is ~25 % cheaper than gathering rows
            return {s: self._pool.submit(lambda s=s: list(self.cache.iter_shard(s, compact=True))) for s in shards}
        mine = [b for b in range(first, len(batches)) if (served + b - first) % self.world == self.rank]
        rows: dict[int, set[int]] = {s: set() for s in shards}
        for b in mine:
            for s, r in batches[b]:
                rows[s].add(r)
        return {s: self._pool.submit(self._read_rows, s, np.array(sorted(r), dtype=np.int64))
                for s, r in rows.items() if r}

    def _read_rows(self, shard: int, rows: np.ndarray) -> dict[int, dict[str, Any]]:
        return dict(zip(rows.tolist(), self.cache.iter_shard(shard, compact=True, rows=rows)))

    def _windows(self) -> Iterator[tuple[int, int, list[Batch]]]:
        epoch, window = self.start.epoch, self.start.window
        while self.epochs is None or epoch < self.epochs:
            windows = self.plan.epoch(epoch)
            for w in range(window, len(windows)):
                yield epoch, w, windows[w]
            epoch, window = epoch + 1, 0

    def _produce(self) -> None:
        try:
            windows = self._windows()
            upcoming = next(windows, None)
            first, served = self.start.batch, 0  # the first window is served from batch start.batch
            reading = self._read_window(*upcoming[2], first, served) if upcoming else None
            while upcoming is not None and not self._stop.is_set():
                epoch, w, (_, batches) = upcoming
                examples = {s: f.result() for s, f in reading.items()}
                after = served + len(batches) - first
                upcoming = next(windows, None)  # read the next window while serving this one
                reading = self._read_window(*upcoming[2], 0, after) if upcoming else None
                for b in range(first, len(batches)):
                    batch = None
                    if served % self.world == self.rank:
                        batch = collate([examples[s][r] for s, r in batches[b]], self.pad_id)
                        if self.pin_memory:
                            batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
                    served += 1
                    if not self._put((batch, self.plan.after(Position(epoch, w, b)))):
                        return
                first = 0
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[dict[str, Any], Position]]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LMStream:
    """Batches of language-modelling blocks: every block once per epoch, in a seeded order.

    `batch(i)` is a function of i and the seed only. Its fields are those of `collate`, with a
    one-hot "teacher" on the next token (top-1 = the target, no tail), so the trainer's losses
    take it as it takes a cache batch; every position but the last of a block is a target.
    """

    def __init__(self, blocks: np.ndarray, batch_size: int, seed: int):
        self.blocks = blocks  # [n, L] int32
        self.batch_size = batch_size
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    @property
    def targets_per_batch(self) -> int:
        return self.batch_size * (self.blocks.shape[1] - 1)

    def _order(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, 2, epoch]).permutation(len(self.blocks))
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = perm
        return perm

    def batch(self, index: int) -> dict[str, Any]:
        n, length = self.blocks.shape
        picks = [self._order(j // n)[j % n] for j in range(index * self.batch_size, (index + 1) * self.batch_size)]
        ids = torch.from_numpy(self.blocks[picks].astype(np.int64))
        positions = torch.arange(length - 1)
        examples = [{"input_ids": x, "positions": positions, "topk_ids": x[1:, None],
                     "topk_logprobs": torch.zeros(length - 1, 1),
                     "tail_logmass": torch.full((length - 1,), -float("inf"))} for x in ids]
        return collate(examples, pad_id=0)

"""The teacher cache on disk: a manifest plus zstd-compressed Parquet shards (SPEC §5).

This module knows Arrow and files, nothing of models or training.

Layout of a cache directory:

    manifest.json                 written last, atomically: the cache is complete when it exists
    progress-rank{R}.json         per-rank list of finished shards (resume state), kept afterwards
    shards/shard-{J:06d}.parquet  one row per example; J is the shard's task number

`pyarrow.dataset.dataset("CACHE/shards")` or `datasets.load_dataset("parquet", data_dir="CACHE/shards")`
read it directly (temporary files start with "." and are ignored by both).

Row schema (one example): `example_id` int64, `input_ids` list<int32>, `positions` list<int32>,
`topk_ids` list<uint16|uint32> (P·k values, each position's k ids sorted ascending),
`topk_logprobs` list<float16> (aligned with topk_ids), `tail_logmass` list<float32> (P values).
Any Parquet reader (pyarrow, datasets, DuckDB, Spark) reads the shards; reshape the flat top-k
columns by the manifest's `k`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from amid.codec import LOGPROB_MANTISSA_BITS, encode_topk, id_dtype

__all__ = ["CacheError", "Cache", "open_cache", "ShardWriter", "FORMAT", "FORMAT_VERSION"]

FORMAT = "amid-topk-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ZSTD_LEVEL = 9
# Large data pages: zstd sees more of each column at once (≈4 % smaller at k = 64, no slower to read).
DATA_PAGE_SIZE = 8 << 20


class CacheError(RuntimeError):
    """A cache that is missing, incomplete, damaged or used with the wrong model."""


SHARD_DIR = "shards"


def shard_name(task: int) -> str:
    return f"{SHARD_DIR}/shard-{task:06d}.parquet"


def progress_name(rank: int) -> str:
    return f"progress-rank{rank}.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary name, fsync, rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Writing


def _schema(vocab_size: int) -> pa.Schema:
    id_type = pa.uint16() if id_dtype(vocab_size) == np.uint16 else pa.uint32()
    return pa.schema(
        [
            ("example_id", pa.int64()),
            ("input_ids", pa.list_(pa.int32())),
            ("positions", pa.list_(pa.int32())),
            ("topk_ids", pa.list_(id_type)),
            ("topk_logprobs", pa.list_(pa.float16())),
            ("tail_logmass", pa.list_(pa.float32())),
        ]
    )


@dataclass
class ShardRecord:
    task: int
    file: str
    examples: int
    positions: int
    bytes: int
    sha256: str
    tail_mass_sum: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ShardWriter:
    """Collects examples of one shard task and writes them atomically as one Parquet file."""

    def __init__(self, directory: Path, task: int, vocab_size: int, k: int):
        self.directory = Path(directory)
        self.task = task
        self.vocab_size = vocab_size
        self.k = k
        self._rows: list[tuple] = []
        self._positions = 0
        self._tail_mass = 0.0

    def add(
        self,
        example_id: int,
        input_ids: list[int] | np.ndarray,
        positions: list[int] | np.ndarray,
        topk_ids: np.ndarray,
        topk_logprobs: np.ndarray,
        tail_logmass: np.ndarray,
    ) -> None:
        """Add one example: topk_* are [P, k] (any id order), tail_logmass [P] float32."""
        p = len(positions)
        if topk_ids.shape != (p, self.k) or topk_logprobs.shape != (p, self.k) or tail_logmass.shape != (p,):
            raise ValueError(
                f"example {example_id}: expected [{p}, {self.k}] top-k and [{p}] tail, got "
                f"{topk_ids.shape}, {topk_logprobs.shape}, {tail_logmass.shape}"
            )
        ids, lps = encode_topk(np.asarray(topk_ids), np.asarray(topk_logprobs, dtype=np.float32), self.vocab_size)
        tail = np.asarray(tail_logmass, dtype=np.float32)
        self._rows.append(
            (int(example_id), np.asarray(input_ids, np.int32), np.asarray(positions, np.int32),
             ids.reshape(-1), lps.reshape(-1), tail)
        )
        self._positions += p
        self._tail_mass += float(np.exp(tail.astype(np.float64)).sum())

    def close(self) -> ShardRecord:
        """Write the shard (temporary name, fsync, rename) and return its record."""
        self._rows.sort(key=lambda r: r[0])
        schema = _schema(self.vocab_size)
        columns = []
        for i, field in enumerate(schema):
            if i == 0:
                columns.append(pa.array([r[0] for r in self._rows], pa.int64()))
                continue
            parts = [r[i] for r in self._rows]
            offsets = np.zeros(len(parts) + 1, np.int32)
            np.cumsum([len(x) for x in parts], out=offsets[1:])
            values = np.concatenate(parts) if parts else np.zeros(0, field.type.value_type.to_pandas_dtype())
            columns.append(
                pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, field.type.value_type))
            )
        table = pa.Table.from_arrays(columns, schema=schema)
        buf = io.BytesIO()
        pq.write_table(
            table,
            buf,
            compression="zstd",
            compression_level=ZSTD_LEVEL,
            use_dictionary=False,
            use_byte_stream_split=["topk_ids.list.element", "topk_logprobs.list.element",
                                   "tail_logmass.list.element"],
            row_group_size=max(len(self._rows), 1),
            data_page_size=DATA_PAGE_SIZE,
        )
        data = buf.getvalue()
        name = shard_name(self.task)
        final = self.directory / name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return ShardRecord(
            task=self.task, file=name, examples=len(self._rows), positions=self._positions,
            bytes=len(data), sha256=sha256_bytes(data), tail_mass_sum=self._tail_mass,
        )


class Progress:
    """Per-rank resume state: which shard tasks are finished, with their records."""

    def __init__(self, directory: Path, rank: int, header: dict[str, Any]):
        self.path = Path(directory) / progress_name(rank)
        self.header = header
        self.shards: dict[int, dict[str, Any]] = {}
        if self.path.exists():
            state = _read_json(self.path)
            if state.get("fingerprint") != header["fingerprint"]:
                raise CacheError(mismatch_message(Path(directory), state.get("header", {}), header))
            for rec in state.get("shards", []):
                f = Path(directory) / rec["file"]
                # A shard listed but missing or of the wrong size is redone, not trusted.
                if f.exists() and f.stat().st_size == rec["bytes"]:
                    self.shards[rec["task"]] = rec

    def add(self, record: ShardRecord) -> None:
        self.shards[record.task] = record.to_dict()
        self.save()

    def save(self) -> None:
        write_json_atomic(
            self.path,
            {"fingerprint": self.header["fingerprint"], "header": self.header,
             "shards": [self.shards[t] for t in sorted(self.shards)]},
        )


def finished_tasks(directory: Path, header: dict[str, Any]) -> set[int]:
    """Shard tasks finished by any rank of this cache run (listed, present, of the listed size)."""
    done: set[int] = set()
    for p in sorted(Path(directory).glob("progress-rank*.json")):
        state = _read_json(p)
        if state.get("fingerprint") != header["fingerprint"]:
            raise CacheError(f"{p}: belongs to a different cache run; delete it")
        for rec in state.get("shards", []):
            f = Path(directory) / rec["file"]
            if f.exists() and f.stat().st_size == rec["bytes"]:
                done.add(rec["task"])
    return done


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path}: unreadable ({exc}); delete it to start this cache again") from None


def mismatch_message(directory: Path, old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = [key for key in ("teacher", "tokenizer", "k", "temperature", "data") if old.get(key) != new.get(key)]
    what = ", ".join(diffs) if diffs else "settings"
    return (
        f"{directory} holds a cache made with a different {what}; choose another --out directory "
        f"or delete that one"
    )


def existing_header(directory: Path) -> dict[str, Any] | None:
    """The header of a cache (complete or in progress) already in `directory`, if any."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if manifest.exists():
        return _read_json(manifest)
    for p in sorted(directory.glob("progress-rank*.json")):
        return _read_json(p).get("header")
    return None


def finalize(directory: Path, header: dict[str, Any], num_tasks: int, extra: dict[str, Any]) -> dict[str, Any] | None:
    """Merge every rank's progress into manifest.json once all shard tasks are finished.

    Returns the manifest, or None if some task is still missing (another rank is still running).
    """
    directory = Path(directory)
    shards: dict[int, dict[str, Any]] = {}
    for p in sorted(directory.glob("progress-rank*.json")):
        state = _read_json(p)
        if state.get("fingerprint") != header["fingerprint"]:
            raise CacheError(f"{p}: belongs to a different cache run; delete it")
        for rec in state.get("shards", []):
            shards[rec["task"]] = rec
    if sorted(shards) != list(range(num_tasks)):
        return None
    records = [shards[t] for t in range(num_tasks)]
    positions = sum(r["positions"] for r in records)
    manifest = {
        **header,
        "counts": {
            "examples": sum(r["examples"] for r in records),
            "positions": positions,
            "bytes": sum(r["bytes"] for r in records),
            "bytes_per_position": (sum(r["bytes"] for r in records) / positions) if positions else 0.0,
            "mean_tail_mass": (sum(r["tail_mass_sum"] for r in records) / positions) if positions else 0.0,
            **extra.get("counts", {}),
        },
        "shards": [{k: r[k] for k in ("file", "examples", "positions", "bytes", "sha256")} for r in records],
        **{k: v for k, v in extra.items() if k != "counts"},
        "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def make_header(
    *, teacher: dict[str, Any], tokenizer: dict[str, Any], k: int, temperature: float,
    data: dict[str, Any], vocab_size: int,
) -> dict[str, Any]:
    """The identity of a cache: everything that makes two caches interchangeable or not."""
    identity = {"teacher": teacher, "tokenizer": tokenizer, "k": k, "temperature": temperature, "data": data}
    fingerprint = sha256_bytes(json.dumps(identity, sort_keys=True, default=str).encode())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **identity,
        "vocab_size": vocab_size,
        "encoding": {
            "topk_ids": f"{id_dtype(vocab_size).name}, k per position, sorted ascending",
            "topk_logprobs": f"float16 with {LOGPROB_MANTISSA_BITS} mantissa bits (round-to-nearest-even "
                             f"from float32), aligned with topk_ids",
            "tail_logmass": "float32, log(1 - sum of top-k probabilities) from the full float32 logits",
            "compression": f"parquet zstd level {ZSTD_LEVEL}, byte-stream split on value columns",
        },
        "fingerprint": fingerprint,
    }


# ----------------------------------------------------------------------------------------------
# Reading


class Cache:
    """A complete cache directory. Iterating yields examples as dicts of torch tensors:

    `example_id` int, `input_ids` [T] int64, `positions` [P] int64, `topk_ids` [P, k] int64,
    `topk_logprobs` [P, k] float32, `tail_logmass` [P] float32.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            if any(self.path.glob("progress-rank*.json")):
                raise CacheError(
                    f"{self.path}: cache is incomplete (no {MANIFEST}); rerun the same "
                    f"`amid cache-teacher` command to resume it"
                )
            raise CacheError(f"{self.path}: not an amid cache (no {MANIFEST})")
        self.manifest: dict[str, Any] = _read_json(manifest_path)
        if self.manifest.get("format") != FORMAT:
            raise CacheError(f"{manifest_path}: not an amid cache manifest")
        if self.manifest.get("format_version", 0) > FORMAT_VERSION:
            raise CacheError(
                f"{manifest_path}: format version {self.manifest['format_version']} is newer than this "
                f"amid understands ({FORMAT_VERSION}); upgrade amid"
            )
        self.k: int = int(self.manifest["k"])
        self.verify = verify

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    def __len__(self) -> int:
        return int(self.manifest["counts"]["examples"])

    @property
    def num_positions(self) -> int:
        return int(self.manifest["counts"]["positions"])

    def read_shard_table(self, index: int) -> pa.Table:
        """The shard's Arrow table, its checksum checked (if `verify`)."""
        info = self.shards[index]
        f = self.path / info["file"]
        try:
            # Read into Arrow-owned memory, not a Python bytes object: Parquet decoding may release
            # its last reference to the input buffer on a pyarrow worker thread, and releasing a
            # Python-owned buffer there needs the GIL, which aborts the process ("terminate called
            # without an active exception") when that happens during interpreter shutdown.
            with pa.OSFile(str(f)) as fh:
                data = fh.read_buffer()
        except OSError as exc:
            reason = exc.strerror or str(exc).splitlines()[0]
            raise CacheError(f"shard {f}: cannot be read ({reason}); the cache is damaged, recreate it") from None
        if len(data) != info["bytes"] or (self.verify and sha256_bytes(data) != info["sha256"]):
            raise CacheError(
                f"shard {f}: checksum mismatch ({len(data)} bytes, manifest says {info['bytes']}); the "
                f"shard is damaged or altered — recreate the cache (or rerun cache-teacher into a new --out)"
            )
        try:
            return pq.ParquetFile(pa.BufferReader(data)).read()  # ≈5 % faster than pq.read_table
        except (pa.ArrowException, OSError) as exc:
            raise CacheError(f"shard {f}: unreadable Parquet ({exc}); recreate the cache") from None

    def iter_shard(self, index: int) -> Iterator[dict[str, Any]]:
        """Examples of one shard, in example_id order."""
        yield from decode_table(self.read_shard_table(index), self.k)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self.shards)):
            yield from self.iter_shard(i)

    def check(self) -> dict[str, Any]:
        """Full verification: every shard's checksum, schema and counts. Raises CacheError."""
        examples = positions = 0
        for i, info in enumerate(self.shards):
            table = self.read_shard_table(i)
            f = self.path / info["file"]
            expected = _schema(int(self.manifest["vocab_size"]))
            if not table.schema.equals(expected):
                raise CacheError(f"shard {f}: schema {table.schema} differs from the format's")
            n_pos = sum(len(x) for x in table.column("positions").to_pylist())
            if table.num_rows != info["examples"] or n_pos != info["positions"]:
                raise CacheError(f"shard {f}: holds {table.num_rows} examples / {n_pos} positions, manifest says "
                                 f"{info['examples']} / {info['positions']}")
            flat = table.column("topk_ids").combine_chunks().flatten()
            if len(flat) != n_pos * self.k:
                raise CacheError(f"shard {f}: {len(flat)} top-k ids for {n_pos} positions at k={self.k}")
            examples += table.num_rows
            positions += n_pos
        counts = self.manifest["counts"]
        if examples != counts["examples"] or positions != counts["positions"]:
            raise CacheError(f"{self.path}: shards hold {examples} examples / {positions} positions, manifest "
                             f"says {counts['examples']} / {counts['positions']}")
        return {"shards": len(self.shards), "examples": examples, "positions": positions}


def _to_torch(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Arrow-backed (read-only) NumPy values as a new torch tensor of `dtype`. Torch converts
    (float16 → float32 with SIMD, about 10× faster than NumPy's astype) into fresh memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": it is only read, into a copy
        return torch.from_numpy(values).to(dtype, copy=True)


def decode_table(table: pa.Table, k: int) -> Iterator[dict[str, Any]]:
    """Examples of a shard table as torch tensors (vectorised decode, then per-example views)."""
    def flat(name: str) -> tuple[list[int], np.ndarray]:
        col = table.column(name).combine_chunks()
        return col.offsets.to_numpy().tolist(), col.values.to_numpy(zero_copy_only=False)

    ex_ids = table.column("example_id").to_numpy().tolist()
    in_off, in_val = flat("input_ids")
    pos_off, pos_val = flat("positions")
    _, id_val = flat("topk_ids")
    _, lp_val = flat("topk_logprobs")
    _, tail_val = flat("tail_logmass")
    input_ids = _to_torch(in_val, torch.int64)
    positions = _to_torch(pos_val, torch.int64)
    topk_ids = _to_torch(id_val, torch.int64).view(-1, k)
    topk_lp = _to_torch(lp_val, torch.float32).view(-1, k)
    tail = _to_torch(tail_val, torch.float32)
    for i, ex_id in enumerate(ex_ids):
        a, b = pos_off[i], pos_off[i + 1]
        yield {
            "example_id": ex_id,
            "input_ids": input_ids[in_off[i]: in_off[i + 1]],
            "positions": positions[a:b],
            "topk_ids": topk_ids[a:b],
            "topk_logprobs": topk_lp[a:b],
            "tail_logmass": tail[a:b],
        }


def open_cache(path: str | os.PathLike, verify: bool = True) -> Cache:
    """Open a complete cache directory. `verify` checks each shard's checksum as it is read."""
    return Cache(path, verify=verify)

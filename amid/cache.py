"""The teacher cache on disk: a manifest plus zstd-compressed Parquet shards (SPEC §5).

This module knows Arrow and files, nothing of models or training.

Layout of a cache directory (format version 2):

    manifest.json                   written last, atomically: the cache is complete when it exists
    progress-rank{R}.json           per-rank list of finished shards (resume state), kept afterwards
    examples/shard-{J:06d}.parquet  one row per example; J is the shard's task number
    topk/shard-{J:06d}.parquet      one row per (target position, rank) of the same examples

A shard is the pair of files with the same J. `examples` columns: `example_id` int64, `input_ids`
list<int32>, `positions` list<int32> (P values), `tail_logmass` list<float32> (P values),
`topk_row` int64. `topk` columns: `topk_id` uint16|uint32, `topk_logprob` float16. An example's
P·k top-k rows are rows [topk_row, topk_row + P·k) of the topk file: position by position, each
position's k ids ascending. `example_id` is the index of the example's record in the data, plus
n << 40 for the n-th later example of a record that made several (`amid.data.record_of`).

Why two files: Parquet decodes list columns value by value through repetition levels, which cost
about as much as the rest of the read (format 1 kept the top-k as lists and decoded ~1.6× slower); the top-k values (k per position, 99 % of the data) are
flat columns here, so they decode as fast as plain arrays, and any Parquet reader (pyarrow,
datasets, DuckDB, Spark, Ray) still reads both: `pyarrow.dataset.dataset("CACHE/topk")`,
`datasets.load_dataset("parquet", data_dir="CACHE/examples")` (temporary files start with "."
and are ignored by both).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from amid.codec import LOGPROB_MANTISSA_BITS, encode_topk, id_dtype

__all__ = ["CacheError", "Cache", "open_cache", "ShardWriter", "FORMAT", "FORMAT_VERSION"]

FORMAT = "amid-topk-cache"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
PARTS = ("examples", "topk")  # the two files of a shard, by directory
ZSTD_LEVEL = 9
# Large data pages: zstd sees more of each column at once (≈4 % smaller at k = 64, no slower to read).
DATA_PAGE_SIZE = 8 << 20
# pyarrow ≥ 21 also cuts pages every 20,000 rows by default, which makes the flat top-k columns
# ≈ 17 % larger; older versions cut by size only.
PAGE_ROWS = ({"max_rows_per_page": 1 << 30}
             if "max_rows_per_page" in inspect.signature(pq.write_table).parameters else {})


class CacheError(RuntimeError):
    """A cache that is missing, incomplete, damaged or used with the wrong model."""


def shard_files(task: int) -> dict[str, str]:
    """The relative paths of shard `task`'s files, by part."""
    return {part: f"{part}/shard-{task:06d}.parquet" for part in PARTS}


def temporary_files(directory: Path) -> Iterator[tuple[Path, int | None]]:
    """Temporary shard files left by killed writers, with their task number (None if unreadable)."""
    for part in PARTS:
        for f in Path(directory).glob(f"{part}/.shard-*.tmp-*"):
            task = f.name[len(".shard-"):].split(".", 1)[0]
            yield f, int(task) if task.isdigit() else None


def unlisted_files(directory: Path, shards: list[dict[str, Any]], shards_only: bool = False) -> list[Path]:
    """Parquet files in the cache's part directories that no shard lists (an earlier cache's,
    left in the directory): any reader of `examples/` or `topk/` as a dataset would mix them in.
    `shards_only`: only files named as a cache names its shards (what may be deleted)."""
    listed = {f["file"] for r in shards for f in r["files"].values()}
    return sorted(f for part in PARTS for f in Path(directory).glob(f"{part}/*.parquet")
                  if f"{part}/{f.name}" not in listed and (not shards_only or SHARD_NAME.fullmatch(f.name)))


SHARD_NAME = re.compile(r"shard-\d{6,}\.parquet")


def is_cache_entry(name: str) -> bool:
    """Whether a name in a cache directory is one a cache (or a rank starting one) writes."""
    return (name in (MANIFEST, *PARTS) or (name.startswith("progress-rank") and name.endswith(".json"))
            or (name.startswith(".") and ".tmp-" in name) or name.startswith(".lock-rank"))


def foreign_entries(directory: Path) -> list[str]:
    """What in `directory` no cache writes: other top-level names, and files in `examples/` or
    `topk/` that are not named as shards (a dataset's own examples/train.parquet, say)."""
    directory = Path(directory)
    if not directory.exists():
        return []
    found = [f.name for f in directory.iterdir() if not is_cache_entry(f.name)]
    for part in PARTS:
        if (directory / part).is_dir():
            found += [f"{part}/{f.name}" for f in (directory / part).iterdir()
                      if not (SHARD_NAME.fullmatch(f.name) or (f.name.startswith(".shard-") and ".tmp-" in f.name))]
    return sorted(found)


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


def _list(value_type: pa.DataType) -> pa.DataType:
    return pa.list_(pa.field("element", value_type, nullable=False))


def schemas(vocab_size: int) -> dict[str, pa.Schema]:
    """The Arrow schema of each part of a shard. Nothing is nullable (it also decodes faster)."""
    id_type = pa.uint16() if id_dtype(vocab_size) == np.uint16 else pa.uint32()
    return {
        "examples": pa.schema([
            pa.field("example_id", pa.int64(), nullable=False),
            pa.field("input_ids", _list(pa.int32()), nullable=False),
            pa.field("positions", _list(pa.int32()), nullable=False),
            pa.field("tail_logmass", _list(pa.float32()), nullable=False),
            pa.field("topk_row", pa.int64(), nullable=False),
        ]),
        "topk": pa.schema([
            pa.field("topk_id", id_type, nullable=False),
            pa.field("topk_logprob", pa.float16(), nullable=False),
        ]),
    }


# Byte-stream split (bytes regrouped into planes before zstd) on the value columns it shrinks.
_SPLIT_COLUMNS = {"examples": ["tail_logmass.list.element"], "topk": ["topk_id", "topk_logprob"]}


@dataclass
class ShardRecord:
    task: int
    examples: int
    positions: int
    bytes: int  # both files
    files: dict[str, dict[str, Any]]  # part -> {"file": relative path, "bytes", "sha256"}
    tail_mass_sum: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ShardWriter:
    """Collects examples of one shard task and writes its two Parquet files, each atomically.
    The pair counts as a shard only once the caller records `close()`'s result (Progress.add)."""

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

    def tables(self) -> dict[str, pa.Table]:
        """The shard's two tables (examples in example_id order), as they will be written."""
        rows = sorted(self._rows, key=lambda r: r[0])
        schema = schemas(self.vocab_size)
        n_pos = np.array([len(r[2]) for r in rows], np.int64)
        topk_row = np.zeros(len(rows), np.int64)
        np.cumsum(n_pos[:-1] * self.k, out=topk_row[1:])

        def lists(i: int, field: pa.Field) -> pa.Array:
            parts = [r[i] for r in rows]
            offsets = np.zeros(len(parts) + 1, np.int32)
            np.cumsum([len(x) for x in parts], out=offsets[1:])
            values = np.concatenate(parts) if parts else np.zeros(0, field.type.value_type.to_pandas_dtype())
            return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, field.type.value_type),
                                            type=field.type)

        ex = schema["examples"]
        examples = pa.Table.from_arrays(
            [pa.array([r[0] for r in rows], pa.int64()), lists(1, ex.field("input_ids")),
             lists(2, ex.field("positions")), lists(5, ex.field("tail_logmass")), pa.array(topk_row, pa.int64())],
            schema=ex,
        )
        tk = schema["topk"]
        flat = [np.concatenate([r[i] for r in rows]) if rows else np.zeros(0, f.type.to_pandas_dtype())
                for i, f in ((3, tk.field("topk_id")), (4, tk.field("topk_logprob")))]
        topk = pa.Table.from_arrays([pa.array(flat[0], tk.field("topk_id").type),
                                     pa.array(flat[1], pa.float16())], schema=tk)
        return {"examples": examples, "topk": topk}

    def close(self) -> ShardRecord:
        """Write the shard's files (each: temporary name, fsync, rename) and return its record.
        The record, written to the progress file by the caller, is what makes the shard count."""
        files: dict[str, dict[str, Any]] = {}
        for part, table in self.tables().items():
            buf = io.BytesIO()
            pq.write_table(
                table, buf, compression="zstd", compression_level=ZSTD_LEVEL, use_dictionary=False,
                use_byte_stream_split=_SPLIT_COLUMNS[part], row_group_size=max(table.num_rows, 1),
                data_page_size=DATA_PAGE_SIZE, **PAGE_ROWS,
            )
            data = buf.getvalue()
            name = shard_files(self.task)[part]
            final = self.directory / name
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:  # a full disk: name the file, leave no temporary behind
                tmp.unlink(missing_ok=True)
                raise CacheError(f"{final}: cannot be written ({exc.strerror or exc}); free space and rerun the "
                                 f"same command to continue (the finished shards are kept)") from None
            os.replace(tmp, final)
            fsync_dir(final.parent)
            files[part] = {"file": name, "bytes": len(data), "sha256": sha256_bytes(data)}
        return ShardRecord(
            task=self.task, examples=len(self._rows), positions=self._positions,
            bytes=sum(f["bytes"] for f in files.values()), files=files, tail_mass_sum=self._tail_mass,
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
                # A shard listed but missing or of the wrong size is redone, not trusted.
                if _present(Path(directory), rec):
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


def finished_shards(directory: Path, header: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Shard records by task, finished by any rank of this cache run: listed in a progress file
    and present with the listed sizes (a record whose files are gone is not a finished task)."""
    shards: dict[int, dict[str, Any]] = {}
    for p in sorted(Path(directory).glob("progress-rank*.json")):
        state = _read_json(p)
        if state.get("fingerprint") != header["fingerprint"]:
            raise CacheError(f"{p}: belongs to a different cache run; delete it")
        for rec in state.get("shards", []):
            if _present(Path(directory), rec):
                shards[rec["task"]] = rec
    return shards


def _listed_files(record: Any) -> dict[str, dict[str, Any]] | None:
    """A shard record's `files` ({part: {file, bytes, ...}} for every part), or None if the
    record is not shaped like one (an edited or foreign JSON file)."""
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or set(files) != set(PARTS):
        return None
    ok = all(isinstance(f, dict) and isinstance(f.get("file"), str) and isinstance(f.get("bytes"), int)
             for f in files.values())
    return files if ok else None


def _present(directory: Path, record: dict[str, Any]) -> bool:
    """Every file of a shard record exists with the recorded size."""
    files = _listed_files(record)
    if files is None or not isinstance(record.get("task"), int):
        return False
    return all((directory / f["file"]).exists() and (directory / f["file"]).stat().st_size == f["bytes"]
               for f in files.values())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path}: unreadable ({exc}); delete it to start this cache again") from None
    if not isinstance(obj, dict):
        raise CacheError(f"{path}: not a JSON object (a {type(obj).__name__}); delete it to start this cache again")
    if "shards" in obj and not isinstance(obj["shards"], list):
        raise CacheError(f"{path}: its 'shards' is not a list; delete it to start this cache again")
    return obj


def _check_manifest(m: dict[str, Any], path: Path) -> None:
    """CacheError naming `path` unless the manifest has the structure a reader relies on (an
    edited or foreign file must not end in a KeyError deep in the trainer)."""
    def malformed(what: str) -> CacheError:
        return CacheError(f"{path}: malformed manifest ({what}); recreate the cache with `amid cache-teacher`")

    for key, kind in (("k", int), ("vocab_size", int), ("temperature", (int, float)), ("shards", list),
                      ("counts", dict), ("tokenizer", dict), ("teacher", dict), ("data", dict)):
        if key not in m:
            raise malformed(f"no {key!r}")
        if not isinstance(m[key], kind) or isinstance(m[key], bool):
            raise malformed(f"{key!r} is {json.dumps(m[key])[:40]}")
    if m["k"] < 1 or m["vocab_size"] < m["k"]:
        raise malformed(f"k {m['k']} with a vocabulary of {m['vocab_size']}")
    for key in ("examples", "positions"):
        if not isinstance(m["counts"].get(key), int):
            raise malformed(f"counts.{key} is {m['counts'].get(key)!r}")
    for i, shard in enumerate(m["shards"]):
        files = _listed_files(shard)
        if files is None or not all(isinstance(f.get("sha256"), str) for f in files.values()):
            raise malformed(f"shard {i} does not list its {' and '.join(PARTS)} files with name, size and sha256")
        for key in ("examples", "positions"):
            if not isinstance(shard.get(key), int):
                raise malformed(f"shard {i}'s {key} count is {shard.get(key)!r}")


def mismatch_message(directory: Path, old: dict[str, Any], new: dict[str, Any]) -> str:
    if old.get("format_version") != new.get("format_version"):
        return (f"{directory} holds a cache in format version {old.get('format_version')}, this amid writes "
                f"version {new.get('format_version')}; choose another --out directory or delete that one")
    old_t, new_t = old.get("teacher") or {}, new.get("teacher") or {}
    how = ("dtype", "logits")
    same_model = {k: v for k, v in old_t.items() if k not in how} == {k: v for k, v in new_t.items() if k not in how}
    same_rest = all(old.get(key) == new.get(key) for key in ("tokenizer", "k", "temperature", "data"))
    if old_t != new_t and same_model and same_rest:
        return (f"{directory} holds a cache computed with the teacher in {old_t.get('dtype')} ({old_t.get('logits')} "
                f"logits), this run computes {new_t.get('dtype')} ({new_t.get('logits')} logits); rerun with the same "
                f"--dtype, or choose another --out directory")
    old_data, new_data = old.get("data") or {}, new.get("data") or {}
    only_content = ({k: v for k, v in old_data.items() if k != "examples_sha256"}
                    == {k: v for k, v in new_data.items() if k != "examples_sha256"})
    if (only_content and old.get("amid_version") != new.get("amid_version")
            and all(old.get(key) == new.get(key) for key in ("teacher", "tokenizer", "k", "temperature"))):
        from amid.data import example_changes

        finish = "" if (directory / MANIFEST).exists() else f", or finish this one with amid {old.get('amid_version')}"
        changes = "; ".join(example_changes(old.get("amid_version"), new.get("amid_version")))
        return (f"{directory} holds a cache made by amid {old.get('amid_version')}, which turned the same data into "
                f"other examples than amid {new.get('amid_version')} does{f' ({changes})' if changes else ''}; "
                f"cache into a new --out{finish}")
    diffs = []
    for key in ("teacher", "tokenizer", "k", "temperature", "data"):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "data" and isinstance(a, dict) and isinstance(b, dict):  # name the settings that changed
            parts = [f"{f} {a.get(f)!r} -> {b.get(f)!r}" for f in sorted({*a, *b})
                     if a.get(f) != b.get(f) and f != "examples_sha256"]
            parts += ["the examples' content"] if a.get("examples_sha256") != b.get("examples_sha256") else []
            diffs.append(f"data ({'; '.join(parts)})")
        else:
            diffs.append(key)
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
    shards = finished_shards(directory, header)
    if sorted(shards) != list(range(num_tasks)):
        return None
    records = [shards[t] for t in range(num_tasks)]
    for stale in unlisted_files(directory, records, shards_only=True):  # an earlier cache's, in this directory
        stale.unlink(missing_ok=True)
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
        "shards": [{k: r[k] for k in ("task", "examples", "positions", "bytes", "files")} for r in records],
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
    fingerprint = sha256_bytes(json.dumps({"format_version": FORMAT_VERSION, **identity}, sort_keys=True,
                                          default=str).encode())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **identity,
        "vocab_size": vocab_size,
        "encoding": {
            "topk_id": f"{id_dtype(vocab_size).name}, k rows per position, ids ascending",
            "topk_logprob": f"float16 with {LOGPROB_MANTISSA_BITS} mantissa bits (round-to-nearest-even "
                            f"from float32), aligned with topk_id",
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
        version = self.manifest.get("format_version", 0)
        if version > FORMAT_VERSION:
            raise CacheError(f"{manifest_path}: format version {version} is newer than this amid understands "
                             f"({FORMAT_VERSION}); upgrade amid")
        if version < FORMAT_VERSION:
            raise CacheError(f"{manifest_path}: format version {version} was written by an older amid; this one "
                             f"reads version {FORMAT_VERSION}: recreate the cache with `amid cache-teacher`")
        _check_manifest(self.manifest, manifest_path)
        self.k: int = int(self.manifest["k"])
        self.verify = verify

    @property
    def content_id(self) -> str:
        """sha256 of every shard file's sha256, in shard order: equal for copies of one cache
        wherever they live (and for a rebuild that wrote the same bytes), different for any other
        data, teacher values or shard layout. A trainer's checkpoint records it, so a run resumes
        only on the data it was planned on."""
        shards = [[r["files"][part]["sha256"] for part in PARTS] for r in self.shards]
        return sha256_bytes(json.dumps(shards).encode())

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    def __len__(self) -> int:
        return int(self.manifest["counts"]["examples"])

    @property
    def num_positions(self) -> int:
        return int(self.manifest["counts"]["positions"])

    def shard_path(self, index: int, part: str) -> Path:
        """Path of one part ("examples" or "topk") of shard `index`."""
        return self.path / self.shards[index]["files"][part]["file"]

    def read_part(self, index: int, part: str) -> pa.Table:
        """One part of a shard as an Arrow table, its checksum checked (if `verify`)."""
        meta = self.shards[index]["files"][part]
        f = self.path / meta["file"]
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
        if len(data) != meta["bytes"]:
            problem = f"is {len(data):,} bytes, the manifest says {meta['bytes']:,}"
        elif self.verify and sha256_bytes(data) != meta["sha256"]:
            problem = "does not match its sha256 in the manifest"
        else:
            problem = None
        if problem:
            raise CacheError(f"shard {f}: {problem}; the shard is damaged or altered — recreate the cache "
                             f"(or rerun cache-teacher into a new --out)")
        try:
            return pq.ParquetFile(pa.BufferReader(data)).read()  # ≈5 % faster than pq.read_table
        except (pa.ArrowException, OSError) as exc:
            raise CacheError(f"shard {f}: unreadable Parquet ({exc}); recreate the cache") from None

    def iter_shard(self, index: int, compact: bool = False, rows: np.ndarray | None = None) -> Iterator[dict[str, Any]]:
        """Examples of one shard, in example_id order, or only the shard's `rows` (in that order);
        `compact`: see `decode_shard`."""
        examples, topk = self.read_part(index, "examples"), self.read_part(index, "topk")
        # Cannot fail with checksums on; without them, never decode shifted rows.
        self._check_topk_rows(index, topk, pc.sum(pc.list_value_length(examples.column("positions"))).as_py() or 0)
        if rows is not None and len(rows) and not 0 <= int(np.min(rows)) <= int(np.max(rows)) < examples.num_rows:
            raise IndexError(f"shard {index} has {examples.num_rows} examples; rows {int(np.min(rows))}.."
                             f"{int(np.max(rows))} were asked for")
        yield from decode_shard(examples, topk, self.k, compact, rows)

    def largest_topk_id(self) -> tuple[int, Path] | None:
        """The largest top-k id in the cache and the topk file that holds it, from the files'
        Parquet statistics (their footers only); None where a file records none."""
        best: tuple[int, Path] | None = None
        for i in range(len(self.shards)):
            f = self.shard_path(i, "topk")
            try:
                meta = pq.ParquetFile(f).metadata
            except (OSError, ValueError) as exc:  # missing file, not Parquet (ArrowInvalid is a ValueError)
                raise CacheError(f"shard {f}: cannot be read ({exc}); the cache is damaged, recreate it") from None
            column = meta.schema.names.index("topk_id")
            for g in range(meta.num_row_groups):
                stats = meta.row_group(g).column(column).statistics
                if stats is None or not stats.has_min_max:
                    return None
                if best is None or int(stats.max) > best[0]:
                    best = (int(stats.max), f)
        return best

    def _check_topk_rows(self, index: int, topk: pa.Table, positions: int) -> None:
        if topk.num_rows != positions * self.k:
            raise CacheError(f"shard {self.shard_path(index, 'topk')}: {topk.num_rows} top-k rows for {positions} "
                             f"positions at k={self.k}; recreate the cache")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self.shards)):
            yield from self.iter_shard(i)

    def check(self) -> dict[str, Any]:
        """Full verification: every shard's checksums, schemas and counts. Raises CacheError."""
        expected = schemas(int(self.manifest["vocab_size"]))
        examples = positions = 0
        for i, info in enumerate(self.shards):
            tables = {part: self.read_part(i, part) for part in PARTS}
            for part, table in tables.items():
                if not table.schema.equals(expected[part]):
                    raise CacheError(f"shard {self.shard_path(i, part)}: schema {table.schema} differs from "
                                     f"the format's")
            ex, f = tables["examples"], self.shard_path(i, "examples")
            n_pos = pc.list_value_length(ex.column("positions")).to_numpy().astype(np.int64)
            n_tail = pc.list_value_length(ex.column("tail_logmass")).to_numpy()
            if ex.num_rows != info["examples"] or int(n_pos.sum()) != info["positions"]:
                raise CacheError(f"shard {f}: holds {ex.num_rows} examples / {int(n_pos.sum())} positions, manifest "
                                 f"says {info['examples']} / {info['positions']}")
            rows = np.concatenate([[0], np.cumsum(n_pos * self.k)])
            if not np.array_equal(n_tail, n_pos) or not np.array_equal(ex.column("topk_row").to_numpy(), rows[:-1]):
                raise CacheError(f"shard {f}: tail_logmass lengths or topk_row do not match the positions")
            self._check_topk_rows(i, tables["topk"], int(n_pos.sum()))
            ids = tables["topk"].column("topk_id").to_numpy().reshape(-1, self.k)
            if self.k > 1 and not (ids[:, 1:] > ids[:, :-1]).all():
                raise CacheError(f"shard {self.shard_path(i, 'topk')}: a position's top-k ids are not strictly "
                                 f"ascending (repeated or out of order); recreate the cache")
            examples += ex.num_rows
            positions += int(n_pos.sum())
        counts = self.manifest["counts"]
        if examples != counts["examples"] or positions != counts["positions"]:
            raise CacheError(f"{self.path}: shards hold {examples} examples / {positions} positions, manifest "
                             f"says {counts['examples']} / {counts['positions']}")
        extra = unlisted_files(self.path, self.shards)
        if extra:
            raise CacheError(f"{extra[0]}: no shard of {self.path / MANIFEST} lists it ({len(extra)} such files): "
                             f"left from another cache; delete them, or Parquet readers of the directory mix them in")
        return {"shards": len(self.shards), "examples": examples, "positions": positions}


def _to_torch(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """NumPy values as a torch tensor of `dtype`. Torch converts (float16 → float32 with SIMD,
    about 10× faster than NumPy's astype); Arrow-backed (read-only) values are copied into fresh
    memory, a fresh (writable) array is used as it is where the dtype already matches."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": it is only read, into a copy
        return torch.from_numpy(values).to(dtype, copy=not values.flags.writeable)


def _flat(column: pa.ChunkedArray) -> np.ndarray:
    return (column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)).to_numpy(zero_copy_only=False)


def decode_shard(examples: pa.Table, topk: pa.Table, k: int, compact: bool = False,
                 rows: np.ndarray | None = None) -> Iterator[dict[str, Any]]:
    """Examples of a shard's two tables as torch tensors (vectorised decode, then per-example views).

    `compact`: top-k ids as int32 and log-probs as float16 (the stored values, exactly) instead of
    int64 / float32, half the memory; the training loader keeps examples so and widens per batch.
    `rows`: decode only these examples (row numbers, in the order given); the tensors then hold
    only their positions, not the whole shard's (a data-parallel rank needs 1/W of a shard)."""
    topk_ids = _flat(topk.column("topk_id")).reshape(-1, k)
    topk_lp = _flat(topk.column("topk_logprob")).reshape(-1, k)
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        # Rows in the topk file follow the positions' order, k per position (Cache.iter_shard checks
        # the count): example e's positions are topk positions [first[e], first[e] + counts[e]).
        offsets = examples.column("positions").combine_chunks().offsets.to_numpy().astype(np.int64)
        first, counts = offsets[rows] - offsets[0], np.diff(offsets)[rows]
        ends = np.cumsum(counts)
        wanted = np.repeat(first - (ends - counts), counts) + np.arange(int(ends[-1]) if len(ends) else 0)
        examples, topk_ids, topk_lp = examples.take(pa.array(rows)), topk_ids[wanted], topk_lp[wanted]

    def lists(name: str) -> tuple[list[int], np.ndarray]:
        col = examples.column(name).combine_chunks()
        offsets = col.offsets.to_numpy()
        values = col.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
        return np.diff(offsets).tolist(), values

    in_len, in_val = lists("input_ids")
    pos_len, pos_val = lists("positions")
    _, tail_val = lists("tail_logmass")
    ids = _to_torch(topk_ids, torch.int32 if compact else torch.int64)
    lps = _to_torch(topk_lp, torch.float16 if compact else torch.float32)
    # torch.split makes every example's view in one call (per-example slicing cost ~2 µs a view).
    columns = (
        torch.split(_to_torch(in_val, torch.int64), in_len),
        torch.split(_to_torch(pos_val, torch.int64), pos_len),
        torch.split(ids, pos_len),
        torch.split(lps, pos_len),
        torch.split(_to_torch(tail_val, torch.float32), pos_len),
    )
    names = ("input_ids", "positions", "topk_ids", "topk_logprobs", "tail_logmass")
    for ex_id, *views in zip(examples.column("example_id").to_numpy().tolist(), *columns):
        yield {"example_id": ex_id, **dict(zip(names, views))}


def open_cache(path: str | os.PathLike, verify: bool = True) -> Cache:
    """Open a complete cache directory. `verify` checks each shard's checksum as it is read."""
    return Cache(path, verify=verify)

"""How big, how exact and how fast the teacher cache is, at k = 64 (issue 3).

    python -m benchmarks.cache_format [--vocab gpt2,qwen2] [--positions 16384] [--json OUT]

For the GPT-2 (50,257) and Qwen2 (151,936) vocabularies (tokenizers from ../shared; a vocabulary
whose tokenizer is absent is skipped with a message):

1. Bytes per target position: the naive int32 ids + float32 log-probs + float32 tail layout
   (516 B raw, and zstd-compressed), the chosen format written by `amid.cache.ShardWriter` (the
   real shard files: Parquet, zstd 9, ids sorted and stored raw, float16 log-probs with 8
   mantissa bits, exact float32 tail, byte-stream split, the top-k as flat columns of a second
   file), and rejected alternatives, each one change away from the chosen format. "read" is the
   rate at which one thread turns the encoded top-k and tail columns back into NumPy arrays.
2. Precision: the sparse (k + 1)-bin loss and its gradient (w.r.t. the student logits, float64)
   with rounded log-probs against the same loss on the unrounded float32 values, for every
   preset in `amid.losses.PRESETS`. Bar: loss within 1e-3 relative, gradient cosine ≥ 0.9999.
3. Decode rate: positions/s through `amid.cache.open_cache(...)` iteration (checksums, Parquet
   decode, torch tensors) on one core, over a cache of ≥ 100k positions. Bar: ≥ 1M/s.

The teacher: no 50k-vocabulary model is available offline, so the distributions come from a
bigram model with unigram backoff counted over the Dolly training set tokenized with that
tokenizer, plus Gaussian logit noise (σ = 0.3), evaluated on held-out Dolly records at their
response tokens (the target positions `amid cache-teacher` would store). Top-k and tail come
from `amid.teacher.teacher_topk` on float32 logits, as in the real cache.

Importable: `measure_cache_format(vocab) -> dict` and `measure_decode_rate(cache_dir) -> float`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch

from amid.cache import PAGE_ROWS, DATA_PAGE_SIZE, ZSTD_LEVEL, ShardWriter, open_cache
from amid.codec import LOGPROB_MANTISSA_BITS, id_dtype, round_logprobs
from amid.data import TemplateConfig, build_examples
from amid.losses import PRESETS, LossConfig, bins_loss, sparse_loss, student_bins, tail_weight_degree
from amid.teacher import teacher_topk

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOP_K = 64
NOISE = 0.3
HELD_OUT = 500
BARS = {"bytes_per_position": 128.0, "loss_rel": 1e-3, "grad_cos": 0.9999, "decode_pos_per_s": 1e6}


# ----------------------------------------------------------------------------------------------
# A realistic teacher from real text


def _tokenizer(vocab: str):
    from transformers import AutoTokenizer

    path = SHARED / "tokenizers" / vocab
    if not path.exists():
        return None
    return AutoTokenizer.from_pretrained(path)


def bigram_teacher(vocab: str, max_positions: int = 16384, seed: int = 0) -> dict[str, Any] | None:
    """Top-k teacher rows for held-out Dolly response positions; None if the files are absent.

    Returns dict(V, examples [(id, input_ids, positions)], ids [P, k] int64, lps [P, k] float32,
    tail [P] float32, rows [P] the context token of each position).
    """
    tok = _tokenizer(vocab)
    data = SHARED / "data" / "instruct" / "dolly_train.jsonl"
    if tok is None or not data.exists():
        return None
    V = len(tok)
    records = [json.loads(line) for line in open(data, encoding="utf-8")]
    train, held = records[:-HELD_OUT], records[-HELD_OUT:]
    # Bigram and unigram counts over the training part (prompt + response, as one text).
    seqs = tok([r["prompt"] + r["response"] for r in train], add_special_tokens=False)["input_ids"]
    flat = np.concatenate([np.asarray(s, np.int64) for s in seqs])
    uni = np.bincount(flat, minlength=V).astype(np.float64) + 0.1
    log_uni = np.log(uni / uni.sum())
    pairs = np.concatenate([np.asarray(s[:-1], np.int64) * V + np.asarray(s[1:], np.int64) for s in seqs if len(s) > 1])
    keys, counts = np.unique(pairs, return_counts=True)
    rows, cols = keys // V, keys % V
    row_ptr = np.searchsorted(rows, np.arange(V + 1))
    csum = np.concatenate([[0], np.cumsum(counts)])
    totals = csum[row_ptr[1:]] - csum[row_ptr[:-1]]

    # Held-out examples exactly as the cache builds them (plain template, response targets).
    examples, _, _ = build_examples(held, tok, TemplateConfig(template="plain", max_length=4096, overflow="truncate"),
                                    "dolly_train (held out)")
    kept, n = [], 0
    for ex in examples:
        if n >= max_positions:
            break
        kept.append(ex)
        n += len(ex.positions)
    ctx = np.concatenate([np.asarray(ex.input_ids, np.int64)[ex.positions] for ex in kept])

    gen = torch.Generator().manual_seed(seed)
    u = torch.from_numpy(np.exp(log_uni)).float()
    out_ids, out_lps, out_tail = [], [], []
    for start in range(0, len(ctx), 256):
        c = ctx[start: start + 256]
        tot = totals[c].astype(np.float64)
        lam = tot / (tot + 5.0)
        p = torch.from_numpy((1.0 - lam).astype(np.float32))[:, None] * u[None, :]
        lens = row_ptr[c + 1] - row_ptr[c]
        which = np.repeat(np.arange(len(c)), lens)
        idx = np.concatenate([np.arange(row_ptr[a], row_ptr[a + 1]) for a in c]) if lens.sum() else np.zeros(0, np.int64)
        add = (lam[which] * counts[idx] / np.maximum(tot[which], 1.0)).astype(np.float32)
        p.index_put_((torch.from_numpy(which), torch.from_numpy(cols[idx])), torch.from_numpy(add), accumulate=True)
        # float32 logits, as a teacher's forward gives them to `teacher_topk`
        logits = p.log_().add_(torch.randn(p.shape, generator=gen), alpha=NOISE)
        ids, lps, tail = teacher_topk(logits, TOP_K)
        out_ids.append(ids.numpy())
        out_lps.append(lps.numpy())
        out_tail.append(tail.numpy())
    return {
        "vocab": vocab, "V": V,
        "examples": [(ex.example_id, ex.input_ids, ex.positions) for ex in kept],
        "ids": np.concatenate(out_ids), "lps": np.concatenate(out_lps), "tail": np.concatenate(out_tail),
    }


# ----------------------------------------------------------------------------------------------
# Sizes


def add_examples(writer: ShardWriter, t: dict, id_offset: int) -> None:
    """Add every example of teacher rows `t` to `writer`, example ids shifted by `id_offset`."""
    a = 0
    for ex_id, input_ids, positions in t["examples"]:
        b = a + len(positions)
        writer.add(id_offset + ex_id, input_ids, positions, t["ids"][a:b], t["lps"][a:b], t["tail"][a:b])
        a = b


def _write_shards(directory: Path, t: dict[str, Any], copies: int = 1) -> list[dict[str, Path]]:
    """Write the teacher rows through the real ShardWriter (one shard per copy); each shard's files by part."""
    shards = []
    n_ex = len(t["examples"])
    for c in range(copies):
        w = ShardWriter(directory, c, t["V"], TOP_K)
        add_examples(w, t, c * n_ex)
        rec = w.close()
        shards.append({part: directory / f["file"] for part, f in rec.files.items()})
    return shards


def _list_column(flat: np.ndarray, per_row: np.ndarray, typ: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(per_row) + 1, np.int32)
    np.cumsum(per_row, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, typ))


def _tables(t: dict[str, Any], ids: np.ndarray, id_type, lps: np.ndarray, lp_type, one_file: bool = False,
            nullable: bool = False) -> dict[str, pa.Table]:
    """A shard's tables with the given top-k encodings: the format's two files (examples, topk),
    or format 1's single file with the top-k as list columns (one row per example)."""
    n_pos = np.array([len(p) for _, _, p in t["examples"]])
    columns = {
        "example_id": pa.array([e for e, _, _ in t["examples"]], pa.int64()),
        "input_ids": _list_column(np.concatenate([np.asarray(i, np.int32) for _, i, _ in t["examples"]]),
                                  np.array([len(i) for _, i, _ in t["examples"]]), pa.int32()),
        "positions": _list_column(np.concatenate([np.asarray(p, np.int32) for _, _, p in t["examples"]]), n_pos, pa.int32()),
        "tail_logmass": _list_column(t["tail"].reshape(-1), n_pos, pa.float32()),
    }
    if one_file:
        columns["topk_ids"] = _list_column(ids.reshape(-1), n_pos * TOP_K, id_type)
        columns["topk_logprobs"] = _list_column(lps.reshape(-1), n_pos * TOP_K, lp_type)
        table = pa.table(columns)
        return {"shard": table if nullable else _required(table)}
    columns["topk_row"] = pa.array(np.concatenate([[0], np.cumsum(n_pos * TOP_K)[:-1]]), pa.int64())
    topk = pa.table({"topk_id": pa.array(ids.reshape(-1), id_type), "topk_logprob": pa.array(lps.reshape(-1), lp_type)})
    tables = {"examples": pa.table(columns), "topk": topk}
    return tables if nullable else {k: _required(v) for k, v in tables.items()}


def _required(table: pa.Table) -> pa.Table:
    """The same table with every field (and list element) declared non-nullable, as the format does."""
    def req(f: pa.Field) -> pa.Field:
        typ = pa.list_(pa.field("element", f.type.value_type, nullable=False)) if pa.types.is_list(f.type) else f.type
        return pa.field(f.name, typ, nullable=False)

    return table.cast(pa.schema([req(f) for f in table.schema]))


def _value_columns(table: pa.Table) -> list[str]:
    """Parquet column paths of the value columns that get byte-stream split (not ids of the input)."""
    names = {"topk_id", "topk_logprob", "topk_ids", "topk_logprobs", "tail_logmass"}
    return [n + (".list.element" if pa.types.is_list(table.schema.field(n).type) else "")
            for n in table.column_names if n in names]


def _parquet(table: pa.Table, bss: bool = True, dictionary: bool = False) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=ZSTD_LEVEL, use_dictionary=dictionary,
                   use_byte_stream_split=_value_columns(table) if bss else False, row_group_size=max(table.num_rows, 1),
                   data_page_size=DATA_PAGE_SIZE, **PAGE_ROWS)
    return buf.getvalue()


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    opts = ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=ZSTD_LEVEL))
    with ipc.new_file(sink, table.schema, options=opts) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _arrow_buffer(blob: bytes) -> pa.Buffer:
    """A copy in Arrow-owned memory. (Arrow worker threads that drop the last reference to a
    Python-owned buffer need the GIL; at interpreter exit that aborts the process.)"""
    out = pa.BufferOutputStream()
    out.write(blob)
    return out.getvalue()


_TOPK_COLUMNS = ("topk_id", "topk_logprob", "topk_ids", "topk_logprobs", "tail_logmass")


def _read_rate(blobs: dict[str, bytes], fmt: str, positions: int, repeat: int = 5) -> float:
    """Positions/s for one thread to decode the top-k and tail columns of a shard's files into NumPy."""
    bufs = [_arrow_buffer(b) for b in blobs.values()]
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        for buf in bufs:
            if fmt == "ipc":
                table = ipc.open_file(pa.BufferReader(buf), options=ipc.IpcReadOptions(use_threads=False)).read_all()
            else:
                wanted = [n for n in pq.ParquetFile(pa.BufferReader(buf)).schema_arrow.names if n in _TOPK_COLUMNS]
                table = pq.read_table(pa.BufferReader(buf), use_threads=False, columns=wanted)
            for name in table.column_names:
                if name in _TOPK_COLUMNS:
                    col = table.column(name).combine_chunks()
                    (col.values if pa.types.is_list(col.type) else col).to_numpy(zero_copy_only=False)
            del table
        best = min(best, time.perf_counter() - t0)
    return positions / best


def _column_bytes(blobs: dict[str, bytes]) -> dict[str, float]:
    out: dict[str, float] = {}
    for blob in blobs.values():
        meta = pq.ParquetFile(pa.BufferReader(_arrow_buffer(blob))).metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                name = col.path_in_schema.split(".")[0]
                out[name] = out.get(name, 0) + col.total_compressed_size
    return out


def size_table(t: dict[str, Any], workdir: Path) -> list[dict[str, Any]]:
    """Bytes per target position (and one-thread read rate) for the chosen format and alternatives."""
    V, P = t["V"], len(t["tail"])
    ids, lps, tail = t["ids"], t["lps"], t["tail"]
    order = np.argsort(ids, axis=1, kind="stable")
    sid = np.take_along_axis(ids, order, 1)
    slp = np.take_along_axis(lps, order, 1)
    idt = id_dtype(V)
    id_type = pa.uint16() if idt == np.uint16 else pa.uint32()
    lp8 = round_logprobs(slp, LOGPROB_MANTISSA_BITS)
    rows: list[dict[str, Any]] = []

    def add(name: str, blobs: dict[str, bytes] | None, fmt: str, note: str, nbytes: float | None = None):
        size = sum(len(b) for b in blobs.values()) if blobs is not None else nbytes
        rows.append({
            "variant": name, "bytes_per_position": size / P, "note": note,
            "read_pos_per_s": _read_rate(blobs, fmt, P) if blobs is not None else None,
        })

    import zstandard

    naive_raw = ids.astype(np.int32).tobytes() + lps.astype(np.float32).tobytes() + tail.astype(np.float32).tobytes()
    add("naive int32 ids + float32 log-probs + float32 tail, raw", None, "", "4·64 + 4·64 + 4 = 516 B",
        nbytes=len(naive_raw))
    add("naive, zstd 9 of the raw bytes", None, "", "general-purpose compression only",
        nbytes=len(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(naive_raw)))
    naive = _tables(t, ids.astype(np.int32), pa.int32(), lps, pa.float32(), one_file=True, nullable=True)
    add("naive, Parquet zstd 9 (default encodings)", {k: _parquet(v, bss=False, dictionary=True) for k, v in naive.items()},
        "parquet", "what pq.write_table(compression='zstd') gives, one row per example")

    # The chosen format, through the real writer.
    shard_dir = Path(tempfile.mkdtemp(dir=workdir))
    (shard,) = _write_shards(shard_dir, t)
    chosen = {part: f.read_bytes() for part, f in shard.items()}
    cols = _column_bytes(chosen)
    topk_only = (cols["topk_id"] + cols["topk_logprob"] + cols["tail_logmass"]) / P
    add(f"**chosen**: sorted {idt.name} ids, fp16 8-bit mantissa, f32 tail; Parquet zstd 9 + byte-stream split, "
        f"top-k in a flat file", chosen, "parquet",
        f"ids {cols['topk_id'] / P:.1f} + log-probs {cols['topk_logprob'] / P:.1f} + tail "
        f"{cols['tail_logmass'] / P:.1f} B (top-k {topk_only:.1f}); the rest is input_ids/positions")
    # Sanity: building the same tables here reproduces the writer's bytes closely.
    mine = sum(len(_parquet(v)) for v in _tables(t, sid.astype(idt), id_type, lp8, pa.float16()).values())
    total = sum(len(b) for b in chosen.values())
    assert abs(mine - total) / total < 0.02, (mine, total)

    def alt(name, note, ids_=sid.astype(idt), id_type_=id_type, lps_=lp8, lp_type=pa.float16(), bss=True,
            fmt="parquet", one_file=False, nullable=False):
        tables = _tables(t, ids_, id_type_, lps_, lp_type, one_file=one_file, nullable=nullable)
        add(name, {k: _ipc(v) if fmt == "ipc" else _parquet(v, bss=bss) for k, v in tables.items()}, fmt, note)

    alt("log-probs float16, full 10-bit mantissa", "2 more bits nobody's loss can see",
        lps_=slp.astype(np.float16))
    bf16_bits = (round_logprobs(slp, 7).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    alt("log-probs bfloat16 (as uint16 bits)", "7-bit mantissa: less precise, and its exponent byte compresses worse",
        lps_=bf16_bits, lp_type=pa.uint16())
    alt("ids in rank order (by probability), not sorted", "sorting by id is what makes ids compressible",
        ids_=ids.astype(idt), lps_=round_logprobs(lps, LOGPROB_MANTISSA_BITS))
    delta = np.diff(sid, axis=1, prepend=0).astype(idt)
    alt("sorted ids delta-coded", "barely smaller than raw sorted ids, and unreadable by other tools",
        ids_=delta)
    alt("without byte-stream split", "the byte planes are what zstd finds repetitive", bss=False)
    alt("one file, top-k as list columns per example (format 1)", "same bytes; list levels halve the read rate",
        one_file=True, nullable=True)
    alt("one file, list columns declared non-nullable", "fewer levels to decode, still list-bound", one_file=True)
    alt("Arrow IPC (Feather v2) zstd 9 instead of Parquet", "no byte-stream split in IPC; Spark and Ray read no IPC",
        fmt="ipc")
    return rows


# ----------------------------------------------------------------------------------------------
# Precision


def precision_table(t: dict[str, Any], n: int = 512, chunk: int = 128, bits_list=(10, 8, 7), seed: int = 0) -> dict[str, Any]:
    """Sparse loss and gradient with rounded log-probs vs unrounded, for every preset.

    The student: logits that put the teacher's top-k near the teacher's values (±0.5 nats) and
    spread the tail mass over the other tokens with unit noise, so teacher and student are close
    (a small loss is the hard case for relative error). float64 throughout. The loss is
    `sparse_loss` computed as its two halves (`student_bins` once per chunk, then `bins_loss`
    per teacher variant, checked equal to `sparse_loss`); gradients are w.r.t. the full
    [n, V] student logits.
    """
    V = t["V"]
    n = min(n, len(t["tail"]))
    ids = torch.from_numpy(t["ids"][:n])
    lp32 = torch.from_numpy(t["lps"][:n]).double()
    tail = torch.from_numpy(t["tail"][:n]).double()
    rounded = {b: torch.from_numpy(round_logprobs(t["lps"][:n], b).astype(np.float64)) for b in bits_list}
    names = list(PRESETS)
    acc = {b: {p: [0.0, 0.0, 0.0, 0.0, 0.0] for p in names} for b in bits_list}  # l0, l1, g0·g1, |g0|², |g1|²
    gen = torch.Generator().manual_seed(seed)
    for a in range(0, n, chunk):
        b_ = min(a + chunk, n)
        z = torch.log(tail[a:b_].exp().clamp_min(1e-300) / (V - TOP_K))[:, None] + torch.randn(
            b_ - a, V, generator=gen, dtype=torch.float64)
        z.scatter_(1, ids[a:b_], lp32[a:b_] + 0.5 * torch.randn(b_ - a, TOP_K, generator=gen, dtype=torch.float64))
        z.requires_grad_()
        bins: dict[Any, tuple] = {}
        for p in names:
            cfg = LossConfig.preset(p)
            s = tail_weight_degree(cfg)
            if s not in bins:
                bins[s] = student_bins(z, ids[a:b_], s)

            def lg(lp):
                loss = bins_loss(*bins[s], lp, tail[a:b_], cfg).sum()
                (g,) = torch.autograd.grad(loss, z, retain_graph=True)
                return loss.item(), g

            l0, g0 = lg(lp32[a:b_])
            if a == 0:  # the two halves are sparse_loss
                ref = sparse_loss(z.detach(), ids[a:b_], lp32[a:b_], tail[a:b_], cfg).sum().item()
                assert math.isclose(ref, l0, rel_tol=1e-9, abs_tol=1e-12), (p, ref, l0)
            for bits in bits_list:
                l1, g1 = lg(rounded[bits][a:b_])
                acc_p = acc[bits][p]
                acc_p[0] += l0
                acc_p[1] += l1
                acc_p[2] += float((g0 * g1).sum())
                acc_p[3] += float((g0 * g0).sum())
                acc_p[4] += float((g1 * g1).sum())
        del bins, z
    out: dict[str, Any] = {"positions": n, "per_bits": {}}
    for bits in bits_list:
        per = {}
        for p in names:
            l0, l1, dot, n0, n1 = acc[bits][p]
            per[p] = {"loss": l0 / n, "loss_rel": abs(l1 - l0) / abs(l0) if l0 else 0.0,
                      "grad_cos": dot / math.sqrt(n0 * n1) if n0 and n1 else 1.0}
        out["per_bits"][bits] = {
            "presets": per,
            "worst_loss_rel": max(v["loss_rel"] for v in per.values()),
            "worst_grad_cos": min(v["grad_cos"] for v in per.values()),
            "max_abs_error": float((rounded[bits] - lp32).abs().max()),
            "max_rel_error": float(((rounded[bits] - lp32).abs() / lp32.abs().clamp_min(1e-30)).max()),
        }
    return out


# ----------------------------------------------------------------------------------------------
# Decode rate


@contextlib.contextmanager
def one_core():
    """Torch, Arrow compute and Arrow I/O limited to one thread each."""
    old = torch.get_num_threads(), pa.cpu_count(), pa.io_thread_count()
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    try:
        yield
    finally:
        torch.set_num_threads(old[0])
        pa.set_cpu_count(old[1])
        pa.set_io_thread_count(old[2])


def measure_decode_rate(cache_dir: str | Path, verify: bool = True, repeat: int = 5) -> float:
    """Positions/s of `open_cache(cache_dir)` iteration (every example's tensors) on one core.

    Torch and Arrow are limited to one thread; the files are read once first so the page cache
    is warm (the rate is the decoder's, not the disk's). Best of `repeat`.
    """
    with one_core():
        cache = open_cache(cache_dir, verify=verify)
        total = cache.num_positions
        for i in range(len(cache.shards)):
            for part in ("examples", "topk"):
                cache.shard_path(i, part).read_bytes()
        best = math.inf
        for _ in range(repeat):
            t0 = time.perf_counter()
            n = 0
            for ex in cache:
                n += ex["topk_ids"].shape[0]
            best = min(best, time.perf_counter() - t0)
            assert n == total
        return total / best


def _decode_cache(t: dict[str, Any], directory: Path, min_positions: int = 100_000) -> Path:
    """A complete cache of ≥ min_positions, written by ShardWriter + finalize (each shard holds
    every held-out example once, under fresh example ids)."""
    from amid.cache import Progress, finalize, make_header

    copies = max(1, math.ceil(min_positions / len(t["tail"])))
    header = make_header(teacher={"name_or_path": f"bigram-{t['vocab']}"}, tokenizer={"vocab_size": t["V"]},
                         k=TOP_K, temperature=1.0, data={"source": "dolly held-out"}, vocab_size=t["V"])
    progress = Progress(directory, 0, header)
    n_ex = len(t["examples"])
    for c in range(copies):
        w = ShardWriter(directory, c, t["V"], TOP_K)
        add_examples(w, t, c * n_ex)
        progress.add(w.close())
    assert finalize(directory, header, copies, {}) is not None
    return directory


# ----------------------------------------------------------------------------------------------


def _write_rate(t: dict[str, Any], workdir: Path, repeat: int = 3) -> float:
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = math.inf
        for _ in range(repeat):
            d = Path(tempfile.mkdtemp(dir=workdir))
            t0 = time.perf_counter()
            _write_shards(d, t)
            best = min(best, time.perf_counter() - t0)
        return len(t["tail"]) / best
    finally:
        torch.set_num_threads(torch_threads)


def _teacher_cached(vocab: str, positions: int, reuse: str | Path | None) -> dict[str, Any] | None:
    """bigram_teacher, memoised as a pickle under `reuse` (the teacher takes a minute or two)."""
    import pickle

    f = Path(reuse) / f"bigram-{vocab}-{positions}.pkl" if reuse else None
    if f is not None and f.exists():
        return pickle.loads(f.read_bytes())
    t = bigram_teacher(vocab, positions)
    if f is not None and t is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(pickle.dumps(t))
    return t


def measure_cache_format(vocab: str, positions: int = 16384, precision_positions: int = 512,
                         decode: bool = True, reuse: str | Path | None = None) -> dict[str, Any]:
    """Everything above for one vocabulary ("gpt2" or "qwen2"); {"skipped": reason} if absent."""
    t0 = time.perf_counter()
    t = _teacher_cached(vocab, positions, reuse)
    if t is None:
        return {"vocab": vocab, "skipped": f"{SHARED}/tokenizers/{vocab} or the Dolly data is not available"}
    t_gen = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sizes = size_table(t, work)
        write = _write_rate(t, work)
        decode_rate = decode_rate_noverify = None
        cache_positions = None
        if decode:
            cache = _decode_cache(t, work / "decode")
            cache_positions = open_cache(cache).num_positions
            decode_rate = measure_decode_rate(cache)
            decode_rate_noverify = measure_decode_rate(cache, verify=False)
    precision = precision_table(t, n=precision_positions)
    chosen = next(r for r in sizes if r["variant"].startswith("**chosen**"))
    return {
        "vocab": vocab, "V": t["V"], "k": TOP_K, "positions": int(len(t["tail"])), "examples": len(t["examples"]),
        "mean_tail_mass": float(np.exp(t["tail"].astype(np.float64)).mean()),
        "mean_top1_prob": float(np.exp(t["lps"][:, 0].astype(np.float64)).mean()),
        "sizes": sizes, "bytes_per_position": chosen["bytes_per_position"],
        "write_pos_per_s": write, "decode_pos_per_s": decode_rate, "decode_pos_per_s_noverify": decode_rate_noverify,
        "decode_cache_positions": cache_positions, "precision": precision, "teacher_seconds": t_gen,
    }


def _fmt_rate(x: float | None) -> str:
    return "" if x is None else f"{x / 1e6:.2f} M/s"


def markdown(results: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    done = [r for r in results if "skipped" not in r]
    for r in results:
        if "skipped" in r:
            lines.append(f"- {r['vocab']}: skipped ({r['skipped']})")
    if not done:
        return "\n".join(lines)
    lines.append(f"### Bytes per target position, k = {TOP_K}\n")
    head = "| variant | " + " | ".join(f"{r['vocab']} V={r['V']:,}: B/pos | read (1 thread)" for r in done) + " | note |"
    lines += [head, "|---|" + "---:|---:|" * len(done) + "---|"]
    for i, row in enumerate(done[0]["sizes"]):
        cells = []
        for r in done:
            x = r["sizes"][i]
            cells += [f"{x['bytes_per_position']:.1f}", _fmt_rate(x["read_pos_per_s"])]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + f" | {row['note']} |")
    lines.append("")
    lines.append("Teacher: " + "; ".join(
        f"{r['vocab']}: {r['positions']:,} held-out Dolly response positions in {r['examples']} examples, mean tail "
        f"mass {r['mean_tail_mass']:.3f}, mean top-1 probability {r['mean_top1_prob']:.3f}" for r in done) + ".")
    lines.append("")
    lines.append("### Precision: sparse loss with rounded log-probs vs unrounded (float64 student, every preset)\n")
    lines.append("| log-prob storage | " + " | ".join(f"{r['vocab']}: worst loss rel. err. | worst grad cosine | max rel. err." for r in done) + " |")
    lines.append("|---|" + "---:|---:|---:|" * len(done))
    bits_list = list(done[0]["precision"]["per_bits"])
    label = {10: "float16 (10-bit mantissa)", LOGPROB_MANTISSA_BITS: f"**chosen: float16, {LOGPROB_MANTISSA_BITS}-bit mantissa (RNE)**",
             7: "bfloat16-equivalent (7-bit mantissa)"}
    for bits in bits_list:
        cells = []
        for r in done:
            p = r["precision"]["per_bits"][bits]
            cells += [f"{p['worst_loss_rel']:.2e}", f"{p['worst_grad_cos']:.7f}", f"{p['max_rel_error']:.2e}"]
        lines.append(f"| {label.get(bits, f'{bits}-bit mantissa')} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Per preset at the chosen {LOGPROB_MANTISSA_BITS}-bit mantissa (loss relative error / gradient cosine):\n")
    lines.append("| preset | " + " | ".join(r["vocab"] for r in done) + " |")
    lines.append("|---|" + "---|" * len(done))
    for p in PRESETS:
        cells = [f"{r['precision']['per_bits'][LOGPROB_MANTISSA_BITS]['presets'][p]['loss_rel']:.2e} / "
                 f"{r['precision']['per_bits'][LOGPROB_MANTISSA_BITS]['presets'][p]['grad_cos']:.7f}" for r in done]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("### Speed, one core\n")
    lines.append("| | " + " | ".join(r["vocab"] for r in done) + " |")
    lines.append("|---|" + "---:|" * len(done))
    lines.append("| decode: `open_cache` iteration, checksums on (positions/s) | " + " | ".join(_fmt_rate(r["decode_pos_per_s"]) for r in done) + " |")
    lines.append("| decode, checksums off | " + " | ".join(_fmt_rate(r["decode_pos_per_s_noverify"]) for r in done) + " |")
    lines.append("| write: `ShardWriter` encode + zstd 9 + fsync (positions/s) | " + " | ".join(_fmt_rate(r["write_pos_per_s"]) for r in done) + " |")
    lines.append("| decode cache size (positions) | " + " | ".join(f"{r['decode_cache_positions']:,}" if r["decode_cache_positions"] else "" for r in done) + " |")
    lines.append("")
    verdicts = []
    for r in done:
        p = r["precision"]["per_bits"][LOGPROB_MANTISSA_BITS]
        ok = {
            f"≤ {BARS['bytes_per_position']:.0f} B/pos": r["bytes_per_position"] <= BARS["bytes_per_position"],
            "loss ≤ 1e-3 rel": p["worst_loss_rel"] <= BARS["loss_rel"],
            "grad cos ≥ 0.9999": p["worst_grad_cos"] >= BARS["grad_cos"],
        }
        if r["decode_pos_per_s"] is not None:
            ok["decode ≥ 1M pos/s/core"] = r["decode_pos_per_s"] >= BARS["decode_pos_per_s"]
        verdicts.append(f"{r['vocab']}: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in ok.items()))
    lines.append("Bars (issue 3): " + "; ".join(verdicts) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", default="gpt2,qwen2", help="comma-separated: gpt2, qwen2")
    ap.add_argument("--positions", type=int, default=16384, help="held-out target positions for the size table")
    ap.add_argument("--precision-positions", type=int, default=512)
    ap.add_argument("--no-decode", action="store_true", help="skip the ≥100k-position decode-rate cache")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    ap.add_argument("--reuse", help="directory to keep the generated teacher rows in between runs")
    args = ap.parse_args(argv)
    results = []
    for vocab in args.vocab.split(","):
        print(f"measuring {vocab} ...", file=sys.stderr, flush=True)
        results.append(measure_cache_format(vocab.strip(), args.positions, args.precision_positions,
                                            decode=not args.no_decode, reuse=args.reuse))
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

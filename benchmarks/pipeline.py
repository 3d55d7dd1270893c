"""Rows 4-7 of amid's benchmark suite (issue 6) and the loader-throughput check (issue 4).

Run through `python -m benchmarks.run --rows 4,5,6,7` (the hooks in benchmarks/run.py call
`bench_cache`, `bench_step`, `bench_teacher_dtype` and `bench_eval` here). Nothing here is imported by amid.

4. Cache write / read throughput at k = 64, one core (torch, Arrow compute and Arrow I/O limited
   to one thread): `ShardWriter.add` + `close` (encode, Parquet zstd 9, fsync) and reading back
   through `open_cache` iteration (checksum, Parquet decode, torch tensors) and through
   `amid.loader.Loader` (collated batches of 16 sequences, one read worker), bytes per position,
   for V = 50257 and V = 151936. Teacher rows: the bigram teacher of benchmarks/cache_format.py
   (real tokenizers, held-out Dolly response positions) when ../shared has its files, else a
   synthetic Zipf teacher (below). Each shard holds the distinct teacher rows once (as
   cache_format.py does), so zstd never sees a row twice within a shard; enough shards are written
   to pass `--cache-positions` positions (CPU 50k from 4,096 distinct rows; GPU 200k from 8,192).
   Throughput is timed under glibc's default malloc behaviour (see `Meter` in benchmarks/run.py).
   Then the demo check: a demo-shaped cache (V = 1024, k = 32, batch 16, ~100-token sequences)
   read by the loader against the demo student (pipelines/demo.py `llama(1024, 64, 2, 4)`) doing
   the trainer's step (`amid.train.batch_loss` + backward + clip + AdamW) on the same batches with
   every core. Targets: decode ≥ 1M positions/s per core and ≥ 10× the demo trainer's
   consumption; loader ≥ 10× the trainer.
5. A training step from the cache vs a step with the teacher online, as `amid.train` runs them
   (`batch_loss` with the cache's top-k, the fused LM-head loss where the trainer would use it;
   vs `batch_loss` with `OnlineTeacher`, i.e. teacher forward + `full_loss`), each with backward,
   clip and AdamW. Student and teacher are Llama-shaped (`pipelines.demo.llama`), teacher ≈ 8×
   the student's parameters. CPU: V = 32000, 11M student / 81M teacher, 2 × 64 tokens. GPU:
   GPT-2-small-shaped student (768 × 12 layers, V = 50257: 124M) and a 1.0B teacher
   (2048 × 18 layers), 16 × 512 tokens, bf16 autocast, teacher weights in bf16. The sweep row:
   caching the batch once (teacher forward in the cache dtype, top-k, `ShardWriter` encode + write,
   as `cache_teacher` does) plus N cache steps, vs N online steps, N = 10.
6. `cache_teacher` with a bf16 vs a float32 teacher forward (GPU by default): the same random
   GPT-2-small-shaped teacher (V = 50257; final-norm gain raised so logits have a trained model's
   spread), the same data (pydoc topics, as pipelines/demo.py builds them): top-k id agreement,
   top-1 agreement, log-probability and tail-mass differences, and positions/s of each.
7. `amid.train.evaluate` on one held-out batch, its logits taken in chunks of rows (the default)
   vs all N rows at once, without and with an eval teacher: V = 151936, a Llama student of width
   64 (CPU; 896 on a GPU, bf16) and a teacher twice as wide; CPU 8 × 129 tokens, GPU 16 × 513.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.cache_format import add_examples, measure_decode_rate, one_core
from amid.cache import Progress, ShardWriter, finalize, make_header, open_cache
from amid.loader import Loader, Plan, scan, split
from amid.losses import LossConfig
from amid.teacher import teacher_topk
from amid.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VOCAB_NAMES = {50257: "gpt2", 151936: "qwen2"}
TOP_K = 64
# The demo's student runs 150 steps of 16 over ~1,400 cached examples (~1.7 epochs); the loader
# check reads `epochs` epochs so that, as in training, the next window is read while one is served.
DEMO = dict(vocab=1024, k=32, hidden=64, layers=2, heads=4, batch=16, mean_len=100, epochs=4)
# Row 5 shapes: (hidden, layers, heads) of the student and the teacher.
STEP_SIZES = {
    "cpu": dict(vocab=32000, student=(256, 4, 4), teacher=(768, 8, 12), batch=2, seq=64),
    "cuda": dict(vocab=50257, student=(768, 12, 12), teacher=(2048, 18, 16), batch=16, seq=512),
}
SWEEP_N = 10


# ----------------------------------------------------------------------------------------------
# Helpers


def _rate(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x / 1e6:.2f} M/s" if x >= 1e5 else f"{x / 1e3:.1f} k/s"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_examples(n_positions: int, mean_len: int, vocab: int, seed: int) -> list[tuple[int, list[int], list[int]]]:
    """Instruction-shaped examples: lengths uniform in [mean/2, 3·mean/2], a 8-24-token prompt,
    targets = the response tokens (as the "plain" template makes them)."""
    rng = np.random.default_rng(seed)
    out, n, i = [], 0, 0
    while n < n_positions:
        length = int(rng.integers(mean_len // 2, 3 * mean_len // 2 + 1))
        prompt = int(rng.integers(8, 25))
        ids = rng.integers(0, vocab, length).tolist()
        positions = list(range(prompt - 1, length - 1))
        out.append((i, ids, positions))
        n += len(positions)
        i += 1
    return out


@torch.no_grad()
def zipf_topk(n: int, vocab: int, k: int, seed: int, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic teacher's top-k rows: logits = a·(log Zipf(1.1) frequency of a token + 2·N(0, 1)),
    a per-position sharpness in [0.6, 1.6]; ids of a Zipf rank are a fixed random permutation.
    Top-k log-probs and the exact tail from `amid.teacher.teacher_topk` on float32 logits."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    base = torch.empty(vocab)
    base[torch.randperm(vocab, generator=gen)] = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    base = base.to(device)
    dgen = torch.Generator(device=device).manual_seed(seed + 1)
    ids, lps, tails = [], [], []
    step = max(1, (1 << 24) // vocab)
    for r0 in range(0, n, step):
        m = min(step, n - r0)
        a = 0.6 + torch.rand(m, 1, device=device, generator=dgen)
        z = a * (base + 2.0 * torch.randn(m, vocab, device=device, generator=dgen))
        i, lp, t = teacher_topk(z, k)
        ids.append(i.cpu().numpy())
        lps.append(lp.cpu().numpy())
        tails.append(t.cpu().numpy())
    return np.concatenate(ids), np.concatenate(lps), np.concatenate(tails).astype(np.float32)


def teacher_rows(vocab: int, k: int, positions: int, mean_len: int, device: torch.device, seed: int = 0,
                 prefer_bigram: bool = True) -> dict[str, Any]:
    """{V, examples [(id, input_ids, positions)], ids [P, k], lps [P, k], tail [P], source}."""
    if prefer_bigram and k == TOP_K and vocab in VOCAB_NAMES:
        try:
            from benchmarks.cache_format import bigram_teacher
        except ImportError:
            bigram_teacher = None
        if bigram_teacher is not None:
            t = bigram_teacher(VOCAB_NAMES[vocab], positions, seed=seed)
            if t is not None and t["V"] == vocab:
                t["source"] = "bigram teacher on held-out Dolly (benchmarks/cache_format.py)"
                return t
    examples = synthetic_examples(positions, mean_len, vocab, seed)
    p = sum(len(e[2]) for e in examples)
    ids, lps, tail = zipf_topk(p, vocab, k, seed, device)
    return {"V": vocab, "examples": examples, "ids": ids, "lps": lps, "tail": tail,
            "source": "synthetic Zipf teacher"}


def write_cache(directory: Path, t: dict[str, Any], k: int, copies: int) -> dict[str, float]:
    """Write `copies` shards (each: every example of `t` once, fresh example ids) and the manifest.
    Returns seconds spent in add (encode) and close (Parquet + zstd + fsync), bytes, positions."""
    header = make_header(teacher={"name_or_path": "benchmark"}, tokenizer={"vocab_size": t["V"]}, k=k,
                         temperature=1.0, data={"source": t.get("source", "")}, vocab_size=t["V"])
    progress = Progress(directory, 0, header)
    n_ex = len(t["examples"])
    add_s = close_s = 0.0
    nbytes = positions = 0
    for c in range(copies):
        w = ShardWriter(directory, c, t["V"], k)
        t0 = time.perf_counter()
        add_examples(w, t, c * n_ex)
        t1 = time.perf_counter()
        rec = w.close()
        t2 = time.perf_counter()
        add_s += t1 - t0
        close_s += t2 - t1
        nbytes += rec.bytes
        positions += rec.positions
        progress.add(rec)
    assert finalize(directory, header, copies, {}) is not None
    return {"add_s": add_s, "close_s": close_s, "bytes": nbytes, "positions": positions}


def loader_run(directory: Path, batch_size: int, num_workers: int = 1, keep: int = 0, epochs: int = 1) -> dict[str, Any]:
    """`epochs` epochs through `amid.loader.Loader` (scan and plan not timed). Returns positions/s,
    tokens/s, batches/s, the wait for the first batch and the first `keep` batches. Over several
    epochs the next window is read while the current one is served, as in training; the first
    window's read is not overlapped with anything and is counted."""
    cache = open_cache(directory)
    metas = scan(cache)
    rows, _ = split(metas, 0.0, 0)
    plan = Plan(metas, rows, seed=0, batch_size=batch_size, max_tokens=None,
                shuffle_buffer=TrainConfig.shuffle_buffer, window_tokens=TrainConfig.shuffle_tokens)
    n = tokens = batches = 0
    kept = []
    first = None
    t0 = time.perf_counter()
    with Loader(cache, plan, pad_id=0, epochs=epochs, num_workers=num_workers) as loader:
        for batch, _ in loader:
            if first is None:
                first = time.perf_counter() - t0
            n += len(batch["rows"])
            tokens += batch["tokens"]
            batches += 1
            if len(kept) < keep:
                kept.append(batch)
    dt = time.perf_counter() - t0
    return {"pos_per_s": n / dt, "tok_per_s": tokens / dt, "batches_per_s": batches / dt, "positions": n,
            "batches": batches, "seconds": dt, "first_batch_s": first, "epochs": epochs, "kept": kept}


# ----------------------------------------------------------------------------------------------
# Students and teachers


def llama_model(vocab: int, shape: tuple[int, int, int], seed: int, device: torch.device, dtype=torch.float32):
    """`pipelines.demo.llama` (tied embeddings, SwiGLU 8/3·H), built on `device`."""
    from pipelines.demo import llama

    hidden, layers, heads = shape
    with torch.device(device):
        model = llama(vocab, hidden=hidden, layers=layers, heads=heads, seed=seed)
    return model.to(device=device, dtype=dtype)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _step_fns(model, batch, loss_cfg, fused, amp, teacher=None):
    """The trainer's step on one batch: batch_loss (under autocast) → backward → clip → AdamW."""
    from amid.heads import Head
    from amid.train import batch_loss

    head = Head(model)
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=1e-6, fused=device.type == "cuda")
    n = len(batch["rows"])

    def autocast():
        return (contextlib.nullcontext() if amp == torch.float32
                else torch.autocast(device.type, dtype=amp))

    def step():
        with autocast():
            per = batch_loss(head, batch, loss_cfg, fused, amp, teacher)
        (per.sum() / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def reset():
        opt.zero_grad(set_to_none=True)

    return head, step, reset


# ----------------------------------------------------------------------------------------------
# Row 4


def bench_cache(meter, args, Row) -> list:
    dev = meter.device
    vocabs = [int(v) for v in args.vocab.split(",")]
    target = args.cache_positions or (200_000 if dev.type == "cuda" else 50_000)
    distinct = args.teacher_positions or (8192 if dev.type == "cuda" else 4096)
    rows = []
    details = []
    tmp = Path(tempfile.mkdtemp(prefix="amid-bench-cache-"))
    try:
        # The demo trainer's consumption first: every rate below is compared with it.
        with meter.unpinned():
            demo = demo_check(meter, tmp / "demo", Row)
        rows += demo["rows"]
        trainer_pos_s = demo["trainer_pos_per_s"]
        for v in vocabs:
            t0 = time.perf_counter()
            t = teacher_rows(v, TOP_K, distinct, 100, dev, prefer_bigram=not args.zipf)
            t_gen = time.perf_counter() - t0
            p0 = len(t["tail"])
            copies = max(1, math.ceil(target / p0))
            d = tmp / f"v{v}"
            with one_core(), meter.unpinned():
                w = write_cache(d, t, TOP_K, copies)
                read = measure_decode_rate(d, verify=True)
                read_nv = measure_decode_rate(d, verify=False)
                lw = loader_run(d, DEMO["batch"], num_workers=1)
            positions = w["positions"]
            write_s = w["add_s"] + w["close_s"]
            bpp = w["bytes"] / positions
            info = {
                "V": v, "positions": positions, "distinct_positions": p0, "source": t["source"],
                "mean_tail_mass": float(np.exp(t["tail"].astype(np.float64)).mean()),
                "mean_top1_prob": float(np.exp(t["lps"].max(1).astype(np.float64)).mean()),
                "write_pos_per_s": positions / write_s, "encode_pos_per_s": positions / w["add_s"],
                "parquet_pos_per_s": positions / w["close_s"], "bytes_per_position": bpp,
                "decode_pos_per_s": read, "decode_pos_per_s_noverify": read_nv,
                "loader_pos_per_s": lw["pos_per_s"], "loader_batches_per_s": lw["batches_per_s"],
                "trainer_pos_per_s": trainer_pos_s, "teacher_rows_s": t_gen,
            }
            details.append(info)
            note = (f"write {_rate(info['write_pos_per_s'])} (encode {_rate(info['encode_pos_per_s'])}, "
                    f"Parquet+zstd+fsync {_rate(info['parquet_pos_per_s'])}); read {_rate(read)} "
                    f"(no checksum {_rate(read_nv)}); {bpp:.1f} B/pos; {t['source'].split(' (')[0]}")
            rows.append(Row("4", "cache read (open_cache, 1 core) vs write (ShardWriter, 1 core)", positions, v,
                            f"k={TOP_K}", "read", "write", a_s=positions / read, b_s=write_s, note=note,
                            extra=info))
            ratio = read / trainer_pos_s
            rows.append(Row("4", "cache decode (1 core) vs demo trainer consuming the same positions", positions, v,
                            f"k={TOP_K}", "decode", "demo trainer", a_s=positions / read,
                            b_s=positions / trainer_pos_s,
                            note=f"decode = {ratio:.0f}× the trainer ({_rate(trainer_pos_s)}); target ≥ 10×: "
                                 f"{'met' if ratio >= 10 else 'MISSED'}; ≥ 1M/s/core: "
                                 f"{'met' if read >= 1e6 else 'MISSED'}", extra={"ratio": ratio}))
            lratio = lw["pos_per_s"] / trainer_pos_s
            rows.append(Row("4", "loader batches (B=16, 1 worker) vs demo trainer", lw["positions"], v, f"k={TOP_K}",
                            "loader", "demo trainer", a_s=lw["seconds"], b_s=lw["positions"] / trainer_pos_s,
                            note=f"loader {_rate(lw['pos_per_s'])} = {lratio:.0f}× the trainer",
                            extra={"ratio": lratio}))
            shutil.rmtree(d, ignore_errors=True)
        print(markdown_cache(details, demo), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def demo_check(meter, directory: Path, Row) -> dict[str, Any]:
    """The demo-sized cache through the loader vs the demo student's training step."""
    dev = meter.device
    t = teacher_rows(DEMO["vocab"], DEMO["k"], 60_000, DEMO["mean_len"], dev, prefer_bigram=False)
    copies = 2
    w = write_cache(directory, t, DEMO["k"], copies)
    with one_core():
        read = measure_decode_rate(directory)
        lw1 = loader_run(directory, DEMO["batch"], num_workers=1, keep=14, epochs=DEMO["epochs"])
    lw2 = loader_run(directory, DEMO["batch"], num_workers=2, epochs=DEMO["epochs"])
    # The demo student, the trainer's step, every core, on the loader's own batches.
    model = llama_model(DEMO["vocab"], (DEMO["hidden"], DEMO["layers"], DEMO["heads"]), 1, dev)
    model.train()
    batches = [{k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()} for b in lw1["kept"]]
    from amid.heads import Head
    from amid.train import batch_loss

    head = Head(model)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda")
    cfg = LossConfig.preset("amid")

    def step(b):
        per = batch_loss(head, b, cfg, None, torch.float32)
        (per.sum() / len(b["rows"])).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:2]:  # warm-up
        step(b)
    _sync(dev)
    t0 = time.perf_counter()
    for b in batches[2:]:
        step(b)
    _sync(dev)
    dt = time.perf_counter() - t0
    timed = batches[2:]
    pos = sum(len(b["rows"]) for b in timed)
    toks = sum(b["tokens"] for b in timed)
    trainer_pos_s, trainer_tok_s = pos / dt, toks / dt
    info = {
        "positions": w["positions"], "bytes_per_position": w["bytes"] / w["positions"],
        "decode_pos_per_s": read, "loader1_pos_per_s": lw1["pos_per_s"], "loader2_pos_per_s": lw2["pos_per_s"],
        "loader1_batches_per_s": lw1["batches_per_s"], "loader2_batches_per_s": lw2["batches_per_s"],
        "trainer_pos_per_s": trainer_pos_s, "trainer_tok_per_s": trainer_tok_s, "trainer_s_per_step": dt / len(timed),
        "trainer_batches_per_s": len(timed) / dt, "trainer_threads": torch.get_num_threads(),
        "tokens_per_batch": toks / len(timed), "positions_per_batch": pos / len(timed),
        "student_params": n_params(model),
    }
    r1 = lw1["pos_per_s"] / trainer_pos_s
    r2 = lw2["pos_per_s"] / trainer_pos_s
    rows = [
        Row("4", "demo: loader (1 worker, 1 thread) vs demo student step", lw1["positions"], DEMO["vocab"],
            f"k={DEMO['k']}", "loader", "student", a_s=lw1["seconds"], b_s=lw1["positions"] / trainer_pos_s,
            note=f"loader {lw1['batches_per_s']:,.0f} batches/s over {lw1['epochs']} epochs (first batch after "
                 f"{lw1['first_batch_s'] * 1e3:.0f} ms) vs student {info['trainer_batches_per_s']:.1f} "
                 f"steps/s ({trainer_tok_s:,.0f} tokens/s): {r1:.0f}×; target ≥ 10×: {'met' if r1 >= 10 else 'MISSED'}",
            extra={**info, "ratio": r1}),
        Row("4", "demo: loader (2 workers, default threads) vs demo student step", lw2["positions"], DEMO["vocab"],
            f"k={DEMO['k']}", "loader", "student", a_s=lw2["seconds"], b_s=lw2["positions"] / trainer_pos_s,
            note=f"{r2:.0f}×", extra={"ratio": r2}),
    ]
    shutil.rmtree(directory, ignore_errors=True)
    return {"rows": rows, "trainer_pos_per_s": trainer_pos_s, "info": info}


def markdown_cache(details: list[dict[str, Any]], demo: dict[str, Any]) -> str:
    d = demo["info"]
    out = ["", "Row 4 detail (one core: torch, Arrow compute and Arrow I/O each 1 thread):", "",
           "| V | positions | teacher | mean tail mass | B/pos | write | encode (add) | Parquet+zstd+fsync (close) "
           "| read: open_cache | read, no checksum | loader B=16 | decode / demo trainer |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in details:
        out.append(
            f"| {r['V']} | {r['positions']:,} | {r['source'].split(' (')[0]} | {r['mean_tail_mass']:.3f} | "
            f"{r['bytes_per_position']:.1f} | {_rate(r['write_pos_per_s'])} | {_rate(r['encode_pos_per_s'])} | "
            f"{_rate(r['parquet_pos_per_s'])} | {_rate(r['decode_pos_per_s'])} | "
            f"{_rate(r['decode_pos_per_s_noverify'])} | {_rate(r['loader_pos_per_s'])} | "
            f"{r['decode_pos_per_s'] / r['trainer_pos_per_s']:.0f}× |")
    out += ["", f"Demo check (V = {DEMO['vocab']}, k = {DEMO['k']}, {d['positions']:,} positions, "
                f"{d['bytes_per_position']:.1f} B/pos): demo student ({d['student_params'] / 1e6:.2f}M parameters, "
                f"{d['trainer_threads']} threads) {d['trainer_s_per_step'] * 1e3:.1f} ms/step = "
                f"{d['trainer_tok_per_s']:,.0f} tokens/s = {_rate(d['trainer_pos_per_s'])} target positions "
                f"({d['tokens_per_batch']:.0f} tokens, {d['positions_per_batch']:.0f} positions a batch); "
                f"decode {_rate(d['decode_pos_per_s'])} (1 core); loader {_rate(d['loader1_pos_per_s'])} "
                f"(1 worker, 1 thread, {d['loader1_batches_per_s']:,.0f} batches/s) = "
                f"{d['loader1_pos_per_s'] / d['trainer_pos_per_s']:.0f}× the student; "
                f"{_rate(d['loader2_pos_per_s'])} with 2 workers and default threads."]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Row 5


def make_batch(vocab: int, batch: int, seq: int, k: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """A collated batch of `batch` full-length sequences (every next token a target), top-k
    fields to be filled from the teacher."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    rows = torch.cat([torch.arange(seq - 1) + b * seq for b in range(batch)])
    return {
        "input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
        "rows": rows.to(device), "targets": input_ids.view(-1)[rows + 1].to(device), "tokens": batch * seq,
    }


def bench_step(meter, args, Row) -> list:
    from amid.data import Example
    from amid.heads import Head
    from amid.train import FUSED_MIN_VOCAB, OnlineTeacher, _fused_loss_fn

    dev = meter.device
    gpu = dev.type == "cuda"
    size = dict(STEP_SIZES["cuda" if gpu else "cpu"])
    if args.step_vocab:
        size["vocab"] = args.step_vocab
    v = size["vocab"]
    amp = torch.bfloat16 if gpu else torch.float32
    cache_dtype = torch.bfloat16 if gpu else torch.float32  # cache_teacher's "auto"
    student = llama_model(v, size["student"], 1, dev)
    student.train()
    teacher = llama_model(v, size["teacher"], 2, dev, dtype=cache_dtype).eval().requires_grad_(False)
    ps, pt = n_params(student), n_params(teacher)
    emb = v * size["student"][0], v * size["teacher"][0]
    batch = make_batch(v, size["batch"], size["seq"], TOP_K, dev)
    n = len(batch["rows"])
    cfg = LossConfig.preset("amid")

    # The cache side's targets: this teacher's own top-k (what cache_teacher would have stored).
    examples = [Example(example_id=i, input_ids=batch["input_ids"][i].tolist(), positions=list(range(size["seq"] - 1)))
                for i in range(size["batch"])]
    from amid.heads import TargetLogits
    from amid.teacher import _forward as forward  # what cache_teacher runs per batch
    tmp = Path(tempfile.mkdtemp(prefix="amid-bench-step-"))
    writer = ShardWriter(tmp, 0, v, TOP_K)
    teacher_logits = TargetLogits(teacher)
    got: list = []

    def cache_batch():  # what cache_teacher does per forward batch, minus the final shard write
        got.clear()
        for ex, (ids, lps, tail) in zip(examples, forward(teacher_logits, examples, TOP_K, 1.0, dev, 0, "row 5 batch")):
            writer.add(ex.example_id, ex.input_ids, ex.positions, ids, lps, tail)
            got.append((ids, lps, tail))

    cache_batch()
    batch["topk_ids"] = torch.from_numpy(np.concatenate([g[0] for g in got])).long().to(dev)
    batch["topk_logprobs"] = torch.from_numpy(np.concatenate([g[1] for g in got])).float().to(dev)
    batch["tail_logmass"] = torch.from_numpy(np.concatenate([g[2] for g in got])).float().to(dev)

    head = Head(student)
    fused = _fused_loss_fn() if (gpu and head.linear and v >= FUSED_MIN_VOCAB) else None
    _, cache_step, reset = _step_fns(student, batch, cfg, fused, amp)
    online = OnlineTeacher(teacher, 1.0)
    _, online_step, _ = _step_fns(student, batch, cfg, None, amp, online)

    def teacher_only():
        with torch.no_grad(), (torch.autocast(dev.type, dtype=amp) if amp != torch.float32 else contextlib.nullcontext()):
            online.logits(batch, v)

    with meter.unpinned():
        t_cache, t_online, t_build, t_teacher = meter.times([cache_step, online_step, cache_batch, teacher_only])
    calls = 1 + meter.warmup + meter.repeat  # cache_batch calls so far: their rows are in the writer
    t0 = time.perf_counter()
    writer.close()
    t_close = (time.perf_counter() - t0) / calls
    shutil.rmtree(tmp, ignore_errors=True)
    m_cache = meter.peak(cache_step, reset)
    m_online = meter.peak(online_step, reset)
    t_build_total = t_build + t_close

    ratio = t_online / t_cache
    label = f"step from cache vs online teacher ({pt / ps:.1f}× params)"
    shape = (f"student {ps / 1e6:.0f}M ({size['student'][1]}×{size['student'][0]}), teacher {pt / 1e6:.0f}M "
             f"({size['teacher'][1]}×{size['teacher'][0]}), non-embedding {(pt - emb[1]) / (ps - emb[0]):.1f}×; "
             f"{size['batch']}×{size['seq']} tokens")
    info = {"student_params": ps, "teacher_params": pt, "param_ratio": pt / ps, "positions": n,
            "cache_step_s": t_cache, "online_step_s": t_online, "teacher_forward_s": t_teacher,
            "cache_build_s": t_build_total, "cache_build_close_s": t_close, "fused": fused is not None,
            "amp": str(amp).replace("torch.", ""), "speedup": ratio, "shape": shape}
    rows = [Row("5", label, n, v, info["amp"], "cache step", "online step", a_s=t_cache, b_s=t_online,
                a_bytes=m_cache, b_bytes=m_online,
                note=f"online = {ratio:.1f}× the cache step (target ≥ 3×: {'met' if ratio >= 3 else 'MISSED'}); "
                     f"teacher forward alone {t_teacher * 1e3:.1f} ms; {'fused' if fused else 'materialised'} sparse "
                     f"loss; {shape}", extra=info)]
    for N in (1, SWEEP_N):
        a = t_build_total + N * t_cache
        b = N * t_online
        rows.append(Row("5", f"sweep of {N}: cache once + {N}× cache steps vs {N}× online steps (per batch)", n, v,
                        info["amp"], "cache sweep", "online sweep", a_s=a, b_s=b,
                        note=f"caching one batch {t_build_total * 1e3:.1f} ms (teacher {str(cache_dtype)[6:]} forward + "
                             f"top-k + encode + write; write {t_close * 1e3:.1f} ms); online/cache = {b / a:.1f}×",
                        extra={"N": N, "speedup": b / a}))
    breakeven = t_build_total / max(t_online - t_cache, 1e-12)
    rows[-1].note += f"; caching pays from N > {breakeven:.2f} runs"
    del student, teacher
    _free(dev)
    return rows


# ----------------------------------------------------------------------------------------------
# Row 7: held-out evaluation in chunks of logit rows vs the whole batch's [N, V] logits

EVAL_SIZES = {
    "cpu": dict(vocab=151936, student=(64, 2, 4), teacher=(128, 2, 4), batch=8, seq=129),
    "cuda": dict(vocab=151936, student=(896, 4, 14), teacher=(1792, 4, 14), batch=16, seq=513),
}


def bench_eval(meter, args, Row) -> list:
    """`amid.train.evaluate` on one held-out batch with its default EVAL_CHUNK_ELEMENTS vs one
    chunk holding the whole batch (what it did before: [N, V] logits and the losses' temporaries
    on them), without and with an eval teacher (`--eval-teacher`: the teacher's [N, V] logits too)."""
    import amid.train as amid_train
    from amid.heads import Head

    dev = meter.device
    gpu = dev.type == "cuda"
    size = EVAL_SIZES["cuda" if gpu else "cpu"]
    v = size["vocab"]
    amp = torch.bfloat16 if gpu else torch.float32
    student = llama_model(v, size["student"], 1, dev).eval()
    teacher = amid_train.OnlineTeacher(llama_model(v, size["teacher"], 2, dev, dtype=amp).eval(), 1.0)
    batch = make_batch(v, size["batch"], size["seq"], TOP_K, dev)
    n = len(batch["rows"])
    ids, lps, tail = zipf_topk(n, v, TOP_K, 0, dev)
    batch.update(topk_ids=torch.from_numpy(ids).long().to(dev), topk_logprobs=torch.from_numpy(lps).float().to(dev),
                 tail_logmass=torch.from_numpy(tail).to(dev))
    head = Head(student)
    cfg = LossConfig.preset("amid", ce_weight=0.1)
    default = amid_train.EVAL_CHUNK_ELEMENTS

    def autocast():
        return contextlib.nullcontext() if amp == torch.float32 else torch.autocast(dev.type, dtype=amp)

    def run(chunk, judge, out):
        def fn():
            out.update(amid_train.evaluate(head, [batch], cfg, dev, autocast, judge, chunk_elements=chunk))
        return fn

    rows = []
    for judge, label in ((None, "held-out evaluation: row chunks vs whole batch"),
                         (teacher, "held-out evaluation with --eval-teacher: row chunks vs whole batch")):
        got_a, got_b = {}, {}
        fa, fb = run(default, judge, got_a), run(n * v + 1, judge, got_b)
        with meter.unpinned():
            t_a, t_b = meter.times([fa, fb])
        m_a, m_b = meter.peak(fa), meter.peak(fb)
        worst = max(abs(got_a[key] - got_b[key]) / max(abs(got_b[key]), 1e-30) for key in got_b)
        rows.append(Row("7", label, n, v, str(amp).replace("torch.", ""), "chunks", "whole batch",
                        a_s=t_a, b_s=t_b, a_bytes=m_a, b_bytes=m_b,
                        note=f"{max(1, default // v)} rows per chunk; metrics agree to {worst:.1e} relative",
                        extra={"rows_per_chunk": max(1, default // v), "max_rel_diff": worst}))
    del student, teacher
    _free(dev)
    return rows


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Row 6: cache_teacher in bf16 vs float32


def _gpt2_tokenizer_dir() -> Path | None:
    for p in (SHARED / "tokenizers" / "gpt2", REPO / ".gpuwork" / "tokenizers" / "gpt2"):
        if (p / "tokenizer.json").exists():
            return p
    return None


def bench_teacher_dtype(meter, args, Row) -> list:
    """cache_teacher with dtype bf16 vs fp32 on one random GPT-2-small-shaped teacher."""
    import amid.data
    import amid.teacher
    from amid.teacher import CacheConfig, cache_teacher
    from pipelines.demo import build_records
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dev = meter.device
    gpu = dev.type == "cuda"
    tmp = Path(tempfile.mkdtemp(prefix="amid-bench-dtype-"))
    try:
        tok_dir = _gpt2_tokenizer_dir()
        if tok_dir is not None:
            tok = AutoTokenizer.from_pretrained(tok_dir)
            tok_note = "GPT-2 tokenizer"
        else:  # any tokenizer will do: the teacher's 50,257 logits are what is compared
            from pipelines.demo import train_tokenizer

            train, _ = build_records(0)
            tok = train_tokenizer([r["prompt"] + r["response"] for r in train], tmp / "tok", 4096)
            tok_note = "4,096-token BPE trained on the data (GPT-2 tokenizer not found)"
        shape = (768, 12, 12) if gpu else (args.dtype_teacher_hidden or 256, 4, 4)
        cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=shape[0], n_layer=shape[1], n_head=shape[2])
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg)
        with torch.no_grad():  # a trained model's logit spread (std ≈ 4) instead of a random init's ≈ 0.5
            model.transformer.ln_f.weight.fill_(4.0 / (cfg.initializer_range * math.sqrt(shape[0])))
        teacher_dir = tmp / "teacher"
        model.save_pretrained(teacher_dir)
        tok.save_pretrained(teacher_dir)
        params = n_params(model)
        del model

        train, _ = build_records(0)
        limit = args.dtype_records or (len(train) if gpu else 200)
        records = train[:limit]

        def load_records(source, split="train", limit=None):  # no `datasets` needed (the GPU box lacks it)
            return list(records[:limit] if limit else records)

        saved = {m: getattr(m, "load_records", None) for m in (amid.teacher, amid.data)}
        for m in saved:
            m.load_records = load_records
        results = {}
        try:
            for dtype in ("fp32", "bf16"):
                common = dict(teacher=str(teacher_dir), data="pydoc_data.topics (pipelines.demo.build_records)",
                              top_k=TOP_K, max_length=256, overflow="truncate", dtype=dtype, device=str(dev),
                              examples_per_shard=4096)
                t0 = time.perf_counter()
                warm = cache_teacher(CacheConfig(out=str(tmp / f"warm-{dtype}"), limit=32, **common),
                                     progress=False, log=lambda *_: None)
                _sync(dev)
                warm_wall = time.perf_counter() - t0
                t0 = time.perf_counter()
                manifest = cache_teacher(CacheConfig(out=str(tmp / dtype), **common), progress=False,
                                         log=lambda *_: None)
                _sync(dev)
                wall = time.perf_counter() - t0
                p_all, p_warm = manifest["counts"]["positions"], warm["counts"]["positions"]
                results[dtype] = {"wall": wall, "positions": p_all, "tail": manifest["counts"]["mean_tail_mass"],
                                  # the 32-record call's wall holds the fixed costs (load, hash, start-up)
                                  "steady": ((p_all - p_warm) / (wall - warm_wall)
                                             if p_all > p_warm and wall > warm_wall else None)}
        finally:
            for m, fn in saved.items():
                if fn is not None:
                    m.load_records = fn
        cmp = compare_caches(tmp / "fp32", tmp / "bf16")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    p = results["fp32"]["positions"]
    a, b = results["bf16"], results["fp32"]
    info = {"teacher_params": params, "records": len(records), "positions": p, "tokenizer": tok_note,
            "bf16_pos_per_s": p / a["wall"], "fp32_pos_per_s": p / b["wall"], "bf16_steady_pos_per_s": a["steady"],
            "fp32_steady_pos_per_s": b["steady"], "mean_tail_mass_fp32": b["tail"],
            "mean_tail_mass_bf16": a["tail"], **cmp}
    note = (f"top-k id agreement {cmp['topk_agree']:.4f} (min {cmp['topk_agree_min']:.3f}), top-1 "
            f"{cmp['top1_agree']:.4f}; |Δ log-prob| on shared ids mean {cmp['lp_diff_mean']:.4f} / p99 "
            f"{cmp['lp_diff_p99']:.4f} / max {cmp['lp_diff_max']:.3f}; |Δ tail mass| mean {cmp['tail_mass_diff_mean']:.2e} "
            f"/ max {cmp['tail_mass_diff_max']:.2e}; bf16 {_rate(p / a['wall'])}, fp32 {_rate(p / b['wall'])} "
            f"positions/s (whole call; {_rate(a['steady'])} / {_rate(b['steady'])} net of fixed costs); teacher {params / 1e6:.0f}M, mean tail mass {b['tail']:.3f}, mean top-1 p "
            f"{cmp['top1_prob_mean']:.3f}")
    row = Row("6", "cache_teacher bf16 vs fp32 teacher forward (random GPT-2-shaped)", p, 50257, "bf16/fp32",
              "bf16", "fp32", a_s=a["wall"], b_s=b["wall"], note=note, extra=info)
    print("\n" + markdown_dtype(info), flush=True)
    return [row]


def compare_caches(dir_a: Path, dir_b: Path) -> dict[str, float]:
    """Agreement of two caches of the same data: per position, the share of top-k ids in both,
    whether the most probable id is the same, |Δ log-prob| on the shared ids, |Δ tail mass|."""
    ca, cb = open_cache(dir_a), open_cache(dir_b)
    other = {ex["example_id"]: ex for ex in cb}
    agree, top1, lp_diffs, tail_d, tail_ld, top1_p = [], [], [], [], [], []
    for ex in ca:
        ey = other[ex["example_id"]]
        ia, ib = ex["topk_ids"], ey["topk_ids"]
        la, lb = ex["topk_logprobs"], ey["topk_logprobs"]
        eq = ia[:, :, None] == ib[:, None, :]  # [P, k, k]
        agree.append(eq.any(-1).float().mean(-1))
        top1.append((ia.gather(1, la.argmax(1, keepdim=True)) == ib.gather(1, lb.argmax(1, keepdim=True))).float()[:, 0])
        lp_diffs.append((la[:, :, None] - lb[:, None, :]).abs()[eq])
        ta, tb = ex["tail_logmass"].double(), ey["tail_logmass"].double()
        tail_d.append((ta.exp() - tb.exp()).abs())
        tail_ld.append((ta - tb).abs())
        top1_p.append(la.max(1).values.exp())
    agree, top1, lp, td, tld = (torch.cat(x) for x in (agree, top1, lp_diffs, tail_d, tail_ld))
    lp = lp.double()
    return {
        "topk_agree": float(agree.mean()), "topk_agree_min": float(agree.min()), "top1_agree": float(top1.mean()),
        "lp_diff_mean": float(lp.mean()), "lp_diff_p99": float(torch.quantile(lp[:1_000_000], 0.99)),
        "lp_diff_max": float(lp.max()), "tail_mass_diff_mean": float(td.mean()), "tail_mass_diff_max": float(td.max()),
        "tail_logmass_diff_mean": float(tld.mean()), "tail_logmass_diff_max": float(tld.max()),
        "top1_prob_mean": float(torch.cat(top1_p).mean()),
    }


def markdown_dtype(r: dict[str, Any]) -> str:
    return "\n".join([
        f"Row 6 detail: cache_teacher, bf16 vs fp32 teacher forward, random GPT-2-shaped teacher "
        f"({r['teacher_params'] / 1e6:.0f}M, V = 50257, final-norm gain raised: logits' std ≈ 4), "
        f"{r['records']} pydoc records, {r['positions']:,} positions, k = {TOP_K}, {r['tokenizer']}:", "",
        "| measure | value |", "|---|---:|",
        f"| top-k id agreement (mean share of the 64 ids in both) | {r['topk_agree']:.4f} |",
        f"| top-k id agreement, worst position | {r['topk_agree_min']:.3f} |",
        f"| top-1 id agreement | {r['top1_agree']:.4f} |",
        f"| \\|Δ log-prob\\| on shared ids: mean / p99 / max (nats) | {r['lp_diff_mean']:.4f} / {r['lp_diff_p99']:.4f} / "
        f"{r['lp_diff_max']:.3f} |",
        f"| \\|Δ tail mass\\| (probability): mean / max | {r['tail_mass_diff_mean']:.2e} / {r['tail_mass_diff_max']:.2e} |",
        f"| \\|Δ tail log-mass\\| (nats): mean / max | {r['tail_logmass_diff_mean']:.2e} / {r['tail_logmass_diff_max']:.2e} |",
        f"| mean tail mass fp32 / bf16 | {r['mean_tail_mass_fp32']:.4f} / {r['mean_tail_mass_bf16']:.4f} |",
        f"| mean top-1 probability (fp32) | {r['top1_prob_mean']:.3f} |",
        f"| cache_teacher positions/s, bf16 / fp32 (whole call: tokenize, hash, forward, write) | "
        f"{_rate(r['bf16_pos_per_s'])} / {_rate(r['fp32_pos_per_s'])} |",
        f"| same, net of fixed costs (the difference with a 32-record call) | "
        f"{_rate(r['bf16_steady_pos_per_s'])} / {_rate(r['fp32_steady_pos_per_s'])} |",
    ])

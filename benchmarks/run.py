"""amid's benchmark suite (issue 6). `make bench` runs `python -m benchmarks.run`.

Every row compares two implementations measured side by side in this one process, on the
same inputs, and reports ratios (first / second): below 1 means the first is faster or smaller.

    1. sparse (k + 1 bins, materialised logits) vs full-vocabulary loss, forward + backward
    2. fused LM-head sparse loss vs materialised logits + sparse loss (both fused strategies)
    3. sparse AMiD loss vs F.cross_entropy on the same logits, every preset
    4. cache write / read throughput, one core, k = 64; loader and decode vs the demo trainer
    5. step from the cache vs online-teacher step (teacher ≈ 8× the student); N-run sweep cost
    6. cache_teacher bf16 vs float32 teacher forward: top-k agreement, log-prob/tail error, speed
       (GPU only unless named in --rows)
    7. held-out evaluation in chunks of logit rows vs the whole batch's [N, V] logits
Rows 4-7 live in benchmarks/pipeline.py (its docstring gives their sizes and method).

Time: median of `--repeat` runs after warm-up (CUDA events on a GPU, perf_counter on CPU), the
two implementations interleaved. Peak memory: the increase of allocated memory over what the
inputs already hold, during one forward + backward, gradients included (they are outputs both
sides must produce). On CUDA this is `torch.cuda.max_memory_allocated`; on CPU it is the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs before each run) over
its resident set before the run, with glibc's mmap threshold pinned at 128 KiB so that freed
tensors go back to the system and the high-water mark follows live tensors (time is measured
with it at 32 MiB, the ceiling of glibc's dynamic threshold, as in a long-running trainer).

Sizes: on a GPU, or with `--full`, the issue's sizes (N = 4096, V = 50257 and 151936; N = 8192,
V = 151936 for row 2). On CPU the default scales N down (`--n`, 128) so the suite runs in a few
minutes on two cores; V and the head widths stay real (GPT-2 small: V = 50257, H = 768;
Qwen2.5-0.5B: V = 151936, H = 896).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from amid.fused import compiled_kernels_enabled, fused_sparse_loss
from amid.losses import PRESETS, LossConfig, full_loss, sparse_loss

HEAD_DIM = {50257: 768, 151936: 896}  # GPT-2 small and Qwen2.5-0.5B students
TOP_K = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Measurement


class Meter:
    """Times and peak memory. On CPU, glibc's mmap threshold is pinned at 128 KiB while memory is
    read (freed tensors leave the resident set at once, so its high-water mark follows live
    tensors) and raised to 32 MiB while time is measured (pinned, every large allocation maps and
    faults fresh pages, which no trainer pays). 32 MiB is the ceiling glibc's dynamic threshold
    reaches in a long-running process; any mallopt call turns the dynamic adjustment off."""

    def __init__(self, device: torch.device, repeat: int, warmup: int):
        self.device = device
        self.repeat = repeat
        self.warmup = warmup
        self._unpinned = 0
        self._libc = None
        if device.type == "cpu":
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                pass
        self._pin()

    def _pin(self) -> None:
        if self._libc is not None:
            self._libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
            self._libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
            self._libc.malloc_trim(0)  # hand the freed heap back: the next reading starts low

    @contextlib.contextmanager
    def unpinned(self):
        """Time-measurement malloc settings inside (mmap threshold 32 MiB); re-entrant."""
        if self._libc is not None and self._unpinned == 0:
            self._libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: the dynamic threshold's ceiling
            self._libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
        self._unpinned += 1
        try:
            yield
        finally:
            self._unpinned -= 1
            if self._unpinned == 0:
                self._pin()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _once(self, fn: Callable[[], None]) -> float:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def times(self, fns: list[Callable[[], None]]) -> list[float]:
        """Median seconds of each function, the functions interleaved run by run."""
        with self.unpinned():
            return self._times(fns)

    def _times(self, fns: list[Callable[[], None]]) -> list[float]:
        for _ in range(self.warmup):
            for fn in fns:
                fn()
        self.sync()
        samples: list[list[float]] = [[] for _ in fns]
        for _ in range(self.repeat):
            for i, fn in enumerate(fns):
                samples[i].append(self._once(fn))
        return [statistics.median(s) for s in samples]

    def peak(self, fn: Callable[[], None], reset: Callable[[], None] = lambda: None) -> float:
        """Bytes allocated at the peak of one call of fn, over what was allocated before it
        (reset() runs first, outside the measurement: it drops the last call's gradients)."""
        assert self._unpinned == 0, "memory is read with the mmap threshold pinned"
        reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return float(torch.cuda.max_memory_allocated(self.device) - base)
        if self._libc is not None:
            self._libc.malloc_trim(0)  # freed heap memory must not be reused inside the reading
        _clear_hwm()
        base = _proc_status("VmRSS")
        fn()
        return float(_proc_status("VmHWM") - base)


def _clear_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set to the current one (Linux >= 4.0)


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _available_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    return float(_proc_meminfo("MemAvailable"))


def _proc_meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024


# ----------------------------------------------------------------------------------------------
# Inputs


def teacher_targets(n: int, v: int, k: int, device: torch.device, gen: torch.Generator):
    """Top-k ids, their log-probabilities and the exact tail log-mass of a random teacher."""
    ids = torch.empty(n, k, dtype=torch.long, device=device)
    top = torch.empty(n, k, dtype=torch.float32, device=device)
    tail = torch.empty(n, dtype=torch.float32, device=device)
    step = max(1, (1 << 24) // v)
    for r0 in range(0, n, step):
        rows = slice(r0, min(n, r0 + step))
        t = torch.randn(rows.stop - r0, v, device=device, generator=gen) * 3.0
        logp = torch.log_softmax(t, dim=-1)
        top[rows], ids[rows] = logp.topk(k, dim=-1)
        tail[rows] = torch.logsumexp(logp.scatter_(1, ids[rows], -math.inf), dim=-1)
    return ids, top, tail


@dataclass
class Row:
    table: str
    label: str
    n: int
    v: int
    dtype: str
    a_name: str
    b_name: str
    a_s: float | None = None
    b_s: float | None = None
    a_bytes: float | None = None
    b_bytes: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def _compare(meter: Meter, fa, fb, reset) -> tuple[list[float | None], list[float | None], str]:
    """Times and peaks of fa and fb (reset() clears gradients before every call)."""

    def wrap(fn):
        def run():
            reset()
            fn()

        return run

    note = ""
    ta = tb = ma = mb = None
    wa, wb = wrap(fa), wrap(fb)
    try:
        ta, tb = meter.times([wa, wb])
        ma = meter.peak(fa, reset)
        mb = meter.peak(fb, reset)
    except RuntimeError as err:
        if not _is_oom(err):
            raise
        note = "B: out of memory"
        reset()
        _free(meter.device)
        try:  # measure what fits on its own
            ta = meter.times([wa])[0]
            ma = meter.peak(fa, reset)
        except RuntimeError as err2:
            if not _is_oom(err2):
                raise
            note = "out of memory"
    reset()
    return [ta, tb], [ma, mb], note


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------------------------
# The rows


def bench_sparse_vs_full(meter, sizes, dtype, gen, cfg) -> list[Row]:
    rows = []
    dev = meter.device
    for n, v in sizes:
        ids, top, tail = teacher_targets(n, v, TOP_K, dev, gen)
        z = (torch.randn(n, v, device=dev, generator=gen) * 2).to(dtype).requires_grad_()
        t = (torch.randn(n, v, device=dev, generator=gen) * 3).to(dtype)

        def reset():
            z.grad = None

        row = Row("1", f"sparse vs full ({cfg.name})", n, v, str(dtype).split(".")[-1], "sparse", "full")
        # full_loss keeps ~13 float32 [N, V] tensors for its backward: skip it where it cannot fit.
        need = 16 * n * v * 4
        if need > 0.8 * _available_bytes(dev):
            (row.a_s,) = meter.times([lambda: (reset(), sparse_loss(z, ids, top, tail, cfg, check_ids=False).mean().backward())])
            row.a_bytes = meter.peak(lambda: sparse_loss(z, ids, top, tail, cfg, check_ids=False).mean().backward(), reset)
            row.note = f"full loss skipped: needs ~{need / 2**30:.0f} GiB"
        else:
            (row.a_s, row.b_s), (row.a_bytes, row.b_bytes), row.note = _compare(
                meter,
                lambda: sparse_loss(z, ids, top, tail, cfg, check_ids=False).mean().backward(),
                lambda: full_loss(z, t, cfg).mean().backward(),
                reset,
            )
        rows.append(row)
        del z, t
        _free(dev)
    return rows


def bench_fused(meter, sizes, dtype, gen, cfg, modes) -> list[Row]:
    rows = []
    dev = meter.device
    for n, v in sizes:
        h = HEAD_DIM.get(v, 1024)
        ids, top, tail = teacher_targets(n, v, TOP_K, dev, gen)
        hidden = torch.randn(n, h, device=dev, generator=gen).to(dtype).requires_grad_()
        weight = (torch.randn(v, h, device=dev, generator=gen) * (2.0 / math.sqrt(h))).to(dtype).requires_grad_()

        def reset():
            hidden.grad = None
            weight.grad = None

        def materialised():
            sparse_loss(hidden @ weight.t(), ids, top, tail, cfg, check_ids=False).mean().backward()

        for mode in modes:
            def fused(mode=mode):
                fused_sparse_loss(hidden, weight, None, ids, top, tail, cfg, mode=mode, check_ids=False).mean().backward()

            row = Row("2", f"fused[{mode}] vs materialised ({cfg.name})", n, v, str(dtype).split(".")[-1],
                      f"fused-{mode}", "materialised", extra={"H": h})
            (row.a_s, row.b_s), (row.a_bytes, row.b_bytes), row.note = _compare(meter, fused, materialised, reset)
            if not row.note:  # the same numbers? relative error of loss and gradients, ‖a − b‖ / ‖b‖
                got = []
                for fn in (
                    lambda: fused_sparse_loss(hidden, weight, None, ids, top, tail, cfg, mode=mode, check_ids=False),
                    lambda: sparse_loss(hidden @ weight.t(), ids, top, tail, cfg, check_ids=False),
                ):
                    reset()
                    loss = fn()
                    loss.mean().backward()
                    got.append((loss.detach(), hidden.grad, weight.grad))
                errs = [_rel_err(a, b) for a, b in zip(*got)]
                row.extra["rel_err"] = errs
                row.note = "rel. err loss {:.0e}, dh {:.0e}, dW {:.0e}".format(*errs)
                del got
                reset()
            rows.append(row)
        del hidden, weight
        _free(dev)
    return rows


def bench_vs_ce(meter, sizes, dtype, gen, presets) -> list[Row]:
    rows = []
    dev = meter.device
    for n, v in sizes:
        ids, top, tail = teacher_targets(n, v, TOP_K, dev, gen)
        labels = ids[:, 0].clone()
        z = (torch.randn(n, v, device=dev, generator=gen) * 2).to(dtype).requires_grad_()

        def reset():
            z.grad = None

        for name in presets:
            cfg = LossConfig.preset(name)
            row = Row("3", f"sparse {name} vs cross_entropy", n, v, str(dtype).split(".")[-1], name, "cross_entropy")
            (row.a_s, row.b_s), (row.a_bytes, row.b_bytes), row.note = _compare(
                meter,
                lambda cfg=cfg: sparse_loss(z, ids, top, tail, cfg, check_ids=False).mean().backward(),
                lambda: F.cross_entropy(z, labels).backward(),
                reset,
            )
            rows.append(row)
        del z
        _free(dev)
    return rows


def floors(meter, n, v, dtype, gen) -> str:
    """Reference costs at one size: one LM-head GEMM [N, H] × [H, V], and one read + write
    pass over [N, V] logits (a copy), so the rows above can be read against them."""
    h = HEAD_DIM.get(v, 1024)
    a = torch.randn(n, h, device=meter.device, generator=gen).to(dtype)
    w = torch.randn(v, h, device=meter.device, generator=gen).to(dtype)
    z = torch.empty(n, v, device=meter.device, dtype=dtype)
    z2 = torch.empty_like(z)
    t_mm, t_copy = meter.times([lambda: torch.mm(a, w.t(), out=z), lambda: z2.copy_(z)])
    nbytes = 2 * z.numel() * z.element_size()
    del a, w, z, z2
    _free(meter.device)
    return (
        f"floors at N={n}, V={v}, H={h}, {str(dtype).split('.')[-1]}: one logits GEMM {_fmt_s(t_mm)} "
        f"({2 * n * v * h / t_mm / 1e9:,.0f} GFLOP/s); one copy of the logits {_fmt_s(t_copy)} "
        f"({nbytes / t_copy / 1e9:.0f} GB/s)"
    )


def bench_cache(meter, args) -> list[Row]:
    """Row 4: cache write and read throughput (positions/s, bytes/position) for k = 64, one core,
    and the loader vs the demo student's step (benchmarks/pipeline.py)."""
    from benchmarks import pipeline

    return pipeline.bench_cache(meter, args, Row)


def bench_training(meter, args) -> list[Row]:
    """Row 5: a training step from the cache vs one with the teacher online (teacher ≈ 8× the
    student) and the cost of an N-run sweep both ways (benchmarks/pipeline.py)."""
    from benchmarks import pipeline

    return pipeline.bench_step(meter, args, Row)


def bench_eval(meter, args) -> list[Row]:
    """Row 7: held-out evaluation in row chunks vs the whole batch (benchmarks/pipeline.py)."""
    from benchmarks import pipeline

    return pipeline.bench_eval(meter, args, Row)


def bench_teacher_dtype(meter, args) -> list[Row]:
    """Row 6: cache_teacher with a bf16 vs a float32 teacher forward: fidelity and positions/s
    (benchmarks/pipeline.py). Runs by default on a GPU only."""
    from benchmarks import pipeline

    return pipeline.bench_teacher_dtype(meter, args, Row)


# ----------------------------------------------------------------------------------------------
# Report


def _fmt_s(t):
    return "—" if t is None else (f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s")


def _fmt_b(b):
    return "—" if b is None else f"{b / 2**20:,.0f} MiB"


def _ratio(a, b):
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def markdown(rows: list[Row]) -> str:
    head = "| # | comparison (A vs B) | N | V | dtype | time A | time B | time A/B | peak A | peak B | peak A/B | note |"
    out = [head, "|" + "---|" * 12]
    for r in rows:
        out.append(
            f"| {r.table} | {r.label} | {r.n} | {r.v} | {r.dtype} | {_fmt_s(r.a_s)} | {_fmt_s(r.b_s)} | "
            f"{_ratio(r.a_s, r.b_s)} | {_fmt_b(r.a_bytes)} | {_fmt_b(r.b_bytes)} | "
            f"{_ratio(r.a_bytes, r.b_bytes)} | {r.note} |"
        )
    return "\n".join(out)


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    parts = [f"torch {torch.__version__}", f"CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"]
    if device.type == "cuda":
        parts.insert(0, f"GPU {torch.cuda.get_device_name(device)}")
    parts.append(f"compiled kernels: {'on' if compiled_kernels_enabled(torch.empty(0, device=device)) else 'off'}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="comma list (default: float32,bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--rows", default=None,
                   help="which tables to run (default 1,2,3,4,5,7 and, on a GPU, 6); rows 4-7 run in the order given")
    p.add_argument("--full", action="store_true", help="the issue's sizes on CPU too")
    p.add_argument("--n", type=int, default=None, help="positions per batch (default 4096 GPU, 128 CPU)")
    p.add_argument("--vocab", default="50257,151936")
    p.add_argument("--big-n", type=int, default=None, help="row 2's extra size (default 8192 on GPU / --full, none on CPU)")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--modes", default=None, help="fused strategies for row 2 (default: recompute,forward on GPU, auto on CPU)")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="default 2 on GPU (compiles), 1 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--cache-positions", type=int, default=None,
                   help="row 4: positions written and read per vocabulary (default 50k CPU, 200k GPU)")
    p.add_argument("--teacher-positions", type=int, default=None,
                   help="row 4: distinct teacher rows per shard (default 4096 CPU, 8192 GPU)")
    p.add_argument("--zipf", action="store_true", help="row 4: the synthetic Zipf teacher even where "
                   "../shared has the bigram teacher's files")
    p.add_argument("--step-vocab", type=int, default=None, help="row 5: vocabulary (default 32000 CPU, 50257 GPU)")
    p.add_argument("--dtype-records", type=int, default=None,
                   help="row 6: records cached (default every pydoc record on GPU, 200 on CPU)")
    p.add_argument("--dtype-teacher-hidden", type=int, default=None, help="row 6 on CPU: teacher width (default 256)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    full = gpu or args.full
    n = args.n or (4096 if full else 128)
    big_n = args.big_n or (8192 if full else None)
    vocabs = [int(x) for x in args.vocab.split(",")]
    dtypes = [DTYPES[d] for d in (args.dtype or ("float32,bfloat16" if gpu else "float32")).split(",")]
    repeat = args.repeat or (10 if gpu else 3)
    order = (args.rows or ("1,2,3,4,5,6,7" if gpu else "1,2,3,4,5,7")).split(",")
    which = set(order)
    warmup = args.warmup if args.warmup is not None else (2 if gpu else 1)
    meter = Meter(device, repeat, warmup)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    cfg = LossConfig.preset("amid")

    print(f"# amid benchmarks — {datetime.date.today().isoformat()}")
    print(f"machine: {machine(device)}")
    print(f"command: python -m benchmarks.run {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"top-k {TOP_K}, repeat {repeat} (median), warm-up {warmup}; ratios are A / B\n", flush=True)

    rows: list[Row] = []
    for dtype in dtypes if which & {"1", "2", "3"} else []:
        print(floors(meter, big_n or n, max(vocabs), dtype, gen) + "\n", flush=True)
        if "1" in which:
            rows += bench_sparse_vs_full(meter, [(n, v) for v in vocabs], dtype, gen, cfg)
            print(markdown(rows[-len(vocabs):]), flush=True)
        if "2" in which:
            sizes = [(n, v) for v in vocabs] + ([(big_n, max(vocabs))] if big_n and big_n != n else [])
            modes = (args.modes or ("recompute,forward" if gpu else "auto")).split(",")
            got = bench_fused(meter, sizes, dtype, gen, cfg, modes)
            rows += got
            print(markdown(got), flush=True)
        if "3" in which:
            got = bench_vs_ce(meter, [(n, max(vocabs))], dtype, gen, args.presets.split(","))
            rows += got
            print(markdown(got), flush=True)
    later = {"4": bench_cache, "5": bench_training, "6": bench_teacher_dtype, "7": bench_eval}
    for key in order:
        if key in later:
            got = later[key](meter, args)
            rows += got
            print(markdown(got) + "\n", flush=True)

    print("\n## all rows\n")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(device), "argv": argv if argv is not None else sys.argv[1:],
                       "date": datetime.date.today().isoformat(), "rows": [r.__dict__ for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()

"""Rank 0's loader under data parallelism: its own batches/s and peak memory for world sizes 1, 2, 4.

Every rank walks the whole stream and collates only its own batches (decoding only their
examples); this measures what that costs one rank. Run from the repository root after
`python -m pipelines.demo --quick`: `python -m benchmarks.loader_ranks [CACHE [WORLD ...]]` (default
demo_out_quick/cache, worlds 1 2 4); figures in benchmarks/RESULTS.md. Peak memory is the growth of
the process's peak resident set while the loader runs (Linux); memory a process has freed stays in
its heap, so only the first world size a process runs reads true: give one WORLD per process.
"""

import re
import sys
import time

import torch

from amid.cache import open_cache
from amid.loader import Loader, Plan, scan, split


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024


def main(cache_dir: str = "demo_out_quick/cache", worlds: tuple[int, ...] = (1, 2, 4), epochs: int = 4) -> None:
    torch.set_num_threads(1)
    cache = open_cache(cache_dir)
    metas = scan(cache)
    plan = Plan(metas, split(metas, 0.05, 1000)[0], 0, 16, None, 4096, 1 << 21)
    for _ in range(2):  # the first pass warms the page cache
        for world in worlds:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak resident set := current one
            base = _rss("VmRSS")
            start = time.perf_counter()
            with Loader(cache, plan, pad_id=0, epochs=epochs, num_workers=1, rank=0, world=world) as loader:
                own = sum(batch is not None for batch, _ in loader)
            seconds = time.perf_counter() - start
            print(f"world {world}: rank 0 got {own} batches in {seconds:.3f} s = {own / seconds:,.0f} own "
                  f"batches/s; whole stream {epochs * plan.batches_per_epoch / seconds:,.0f}/s; "
                  f"peak memory +{(_rss('VmHWM') - base) / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main(*sys.argv[1:2], *([tuple(int(w) for w in sys.argv[2:])] if sys.argv[2:] else []))

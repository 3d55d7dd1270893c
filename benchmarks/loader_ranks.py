"""Rank 0's loader under data parallelism: its own batches/s for world sizes 1, 2 and 4.

Every rank walks the whole stream (decoding every shard) and collates only its batches; this
measures what that costs one rank. Run from the repository root after
`python -m pipelines.demo --quick` (it reads demo_out_quick/cache); figures in benchmarks/RESULTS.md.
"""

import time

import torch

from amid.cache import open_cache
from amid.loader import Loader, Plan, scan, split


def main(cache_dir: str = "demo_out_quick/cache", epochs: int = 4) -> None:
    torch.set_num_threads(1)
    cache = open_cache(cache_dir)
    metas = scan(cache)
    plan = Plan(metas, split(metas, 0.05, 1000)[0], 0, 16, None, 4096, 1 << 21)
    for _ in range(2):  # the first pass warms the page cache
        for world in (1, 2, 4):
            start = time.perf_counter()
            with Loader(cache, plan, pad_id=0, epochs=epochs, num_workers=1, rank=0, world=world) as loader:
                own = sum(batch is not None for batch, _ in loader)
            seconds = time.perf_counter() - start
            print(f"world {world}: rank 0 got {own} batches in {seconds:.3f} s = {own / seconds:,.0f} own "
                  f"batches/s; whole stream {epochs * plan.batches_per_epoch / seconds:,.0f}/s")


if __name__ == "__main__":
    main()

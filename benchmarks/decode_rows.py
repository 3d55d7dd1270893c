"""What a data-parallel rank pays to read one shard: the files, then decoding every W-th row.

`python -m benchmarks.decode_rows CACHE [--make]`: with `--make`, first writes CACHE (5 shards of
the bigram teacher's k = 64 top-k on Dolly, V = 151936, through benchmarks.pipeline; ~4 min, needs
../shared, else a synthetic Zipf teacher). Then times, on shard 0 with 1 thread, best of 5:
reading both Parquet files (`Cache.read_part`: sha256 + zstd + Arrow) and
`decode_shard(compact=True)` of every row and of every 2nd / 4th / 8th one. Figures in
benchmarks/RESULTS.md ("A rank decodes only its own examples").
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

from amid.cache import decode_shard, open_cache


def best_ms(fn, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main(cache_dir: str, make: bool = False) -> None:
    torch.set_num_threads(1)
    if make:
        from benchmarks.pipeline import teacher_rows, write_cache

        t = teacher_rows(151936, 64, 200_000, 160, torch.device("cpu"))
        print(f"{t['source']}: {write_cache(Path(cache_dir), t, 64, 5)}")
    cache = open_cache(cache_dir)
    examples, topk = cache.read_part(0, "examples"), cache.read_part(0, "topk")
    print(f"shard 0: {examples.num_rows} examples, {cache.shards[0]['positions']} positions, k = {cache.k}")
    print(f"read both files: {best_ms(lambda: (cache.read_part(0, 'examples'), cache.read_part(0, 'topk'))):.1f} ms")
    print(f"decode every row: {best_ms(lambda: list(decode_shard(examples, topk, cache.k, True))):.1f} ms")
    for w in (1, 2, 4, 8):
        rows = np.arange(0, examples.num_rows, w)
        ms = best_ms(lambda: list(decode_shard(examples, topk, cache.k, True, rows)))
        print(f"decode rows[::{w}] (gathered): {ms:.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1], "--make" in sys.argv[2:])

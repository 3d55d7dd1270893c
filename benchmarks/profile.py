"""Where the time goes: torch.profiler tables for one forward + backward of a loss path.

    python -m benchmarks.profile --case sparse --n 4096 --v 151936 --dtype bfloat16
    python -m benchmarks.profile --case fused-recompute --n 8192 --v 151936 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from amid.fused import fused_sparse_loss
from amid.losses import LossConfig, sparse_loss
from benchmarks.run import DTYPES, HEAD_DIM, Meter, teacher_targets


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--case", default="sparse", help="sparse | ce | materialised | fused-recompute | fused-forward")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--preset", default="amid")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--chunk-elements", type=int, default=None, help="override amid.fused._CHUNK_ELEMENTS")
    p.add_argument("--compile-objective", action="store_true", help="torch.compile bins_loss (experiment)")
    args = p.parse_args(argv)
    from amid import fused, losses

    if args.chunk_elements:
        fused._CHUNK_ELEMENTS = fused._CHUNK_ELEMENTS_EAGER = args.chunk_elements
    if args.compile_objective:
        compiled = torch.compile(losses.bins_loss, dynamic=True)
        losses.bins_loss = fused.bins_loss = compiled
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=dev).manual_seed(0)
    n, v = args.n, args.v
    h = HEAD_DIM.get(v, 1024)
    cfg = LossConfig.preset(args.preset)
    ids, top, tail = teacher_targets(n, v, 64, dev, gen)
    if args.case in ("sparse", "ce"):
        z = (torch.randn(n, v, device=dev, generator=gen) * 2).to(dtype).requires_grad_()
        labels = ids[:, 0].clone()
        leaves = [z]
        if args.case == "sparse":
            fn = lambda: sparse_loss(z, ids, top, tail, cfg, check_ids=False).mean().backward()  # noqa: E731
        else:
            fn = lambda: F.cross_entropy(z, labels).backward()  # noqa: E731
    else:
        hid = torch.randn(n, h, device=dev, generator=gen).to(dtype).requires_grad_()
        w = (torch.randn(v, h, device=dev, generator=gen) * (2 / math.sqrt(h))).to(dtype).requires_grad_()
        leaves = [hid, w]
        if args.case == "materialised":
            fn = lambda: sparse_loss(hid @ w.t(), ids, top, tail, cfg, check_ids=False).mean().backward()  # noqa: E731
        else:
            mode = args.case.split("-", 1)[1]
            fn = lambda: fused_sparse_loss(hid, w, None, ids, top, tail, cfg, mode=mode, check_ids=False).mean().backward()  # noqa: E731

    def run():
        for t in leaves:
            t.grad = None
        fn()

    meter = Meter(dev, 5, 2)
    (t,) = meter.times([run])
    print(f"{args.case} N={n} V={v} {args.dtype} {args.preset}: {t * 1e3:.2f} ms (median of 5)")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        run()
        meter.sync()
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()

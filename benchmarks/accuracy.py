"""float32 accuracy of the losses against float64 arithmetic on the same float32 inputs.

For each common logit offset (a model's logits can all sit far from 0: a large bias, an
unnormalised head) and two teachers (one independent of the student, one opposed to it, so the
student's tail holds nearly all its mass on every row, as early in training), prints the worst relative error of the per-position
loss and max |error| / max |gradient| of the gradient with respect to the logits, for
`full_loss` (the bar: `log_softmax`'s own accuracy), `sparse_loss` and `fused_sparse_loss`
(gradient with respect to the hidden states). Inputs are multiples of 1/8 or 1/64, so float32
logits, and the fused loss's float32 matmul, are exact: what is measured is the arithmetic alone.
Run from the repository root: `python -m benchmarks.accuracy`; figures in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math

import torch

from amid.fused import fused_sparse_loss
from amid.losses import LossConfig, full_loss, sparse_loss


def dyadic(t: torch.Tensor, step: int) -> torch.Tensor:
    return (t * step).round() / step


def problem(n: int, v: int, k: int, h: int, offset: float, opposed: bool, seed: int = 0):
    """Teacher logits, its top-k bins, and a student head. `opposed`: the teacher's logits are the
    student's negated (plus noise), so the teacher's top-k are the student's least likely tokens
    and q_tail is within ~1e-6 of 1 on every row."""
    gen = torch.Generator().manual_seed(seed)
    hidden = dyadic(torch.randn(n, h, dtype=torch.float64, generator=gen), 8)
    weight = dyadic(torch.randn(v, h, dtype=torch.float64, generator=gen) * 0.5, 8)
    noise = torch.randn(n, v, dtype=torch.float64, generator=gen)
    teacher = dyadic(-(hidden @ weight.T) + noise if opposed else 3 * noise, 64)
    log_p = teacher.log_softmax(-1)
    top, ids = log_p.topk(k, dim=-1)
    in_s = torch.zeros_like(log_p, dtype=torch.bool).scatter_(1, ids, True)
    tail = torch.logsumexp(log_p.masked_fill(in_s, -math.inf), dim=-1)
    bias = torch.full((v,), offset, dtype=torch.float64)
    return teacher.float(), ids, top.float(), tail.float(), hidden.float(), weight.float(), bias.float()


def errors(fn, x32: torch.Tensor) -> tuple[float, float]:
    out = []
    for x in (x32, x32.double()):
        leaf = x.clone().requires_grad_()
        loss = fn(leaf)
        loss.sum().backward()
        out.append((loss.detach().double(), leaf.grad.double()))
    (loss, grad), (ref, ref_grad) = out
    loss_err = ((loss - ref).abs() / ref.abs().clamp(min=1e-30)).max().item()
    grad_err = ((grad - ref_grad).abs().max() / ref_grad.abs().max().clamp(min=1e-300)).item()
    return loss_err, grad_err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=5000)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--presets", default="kd,rkl,srkl,abkd,amid")
    ap.add_argument("--offsets", default="0,100,10000")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="on CUDA the compiled kernels are on (amid.fused); float64 references too")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}; N = {args.n}, V = {args.vocab}, k = {args.top_k}; "
          "errors of float32 against float64 on the same inputs (loss: worst relative; "
          "gradient: max |error| / max |gradient|)\n")
    print("| student | offset | preset | full loss | full grad | sparse loss | sparse grad | fused loss | fused grad h |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for opposed in (False, True):
        for offset in (float(o) for o in args.offsets.split(",")):
            teacher, ids, top, tail, hidden, weight, bias = (t.to(device) for t in problem(
                args.n, args.vocab, args.top_k, 16, offset, opposed))
            logits = hidden @ weight.T + bias  # exact: dyadic inputs
            for name in args.presets.split(","):
                cfg = LossConfig.preset(name)

                def full(z):
                    return full_loss(z, teacher.to(z.dtype), cfg)

                def sparse(z):
                    return sparse_loss(z, ids, top.to(z.dtype), tail.to(z.dtype), cfg)

                def fused(hh):
                    dt = hh.dtype
                    return fused_sparse_loss(hh, weight.to(dt), bias.to(dt), ids, top.to(dt), tail.to(dt), cfg)

                cells = [*errors(full, logits), *errors(sparse, logits), *errors(fused, hidden)]
                print(f"| {'opposed' if opposed else 'random'} | {offset:g} | {name} | "
                      + " | ".join(f"{c:.1e}" for c in cells) + " |")


if __name__ == "__main__":
    main()

"""The student side of the sparse loss: its k + 1 bins from [N, V] logits, and their gradient.

`student_bins(logits, topk_ids, s)` returns log q(S) [N, k], log q_tail [N] (a logsumexp over
the complement of the top-k S, exact even when S holds almost all the mass) and, for the α-β
divergence, log γ = log Σ_{x∉S} (q(x)/q_tail)^s. It is a custom autograd function: the forward
reads the logits chunk by chunk; the backward writes dL/dlogits in place from the bins'
gradients in a factored form (`BinGrads`): for j ∈ S a per-entry value, for j ∉ S
coef · exp(z_j − lse_tail) [+ gs · exp(s·z_j − lse_s_tail)]. No autograd graph over [N, V]
intermediates, no [N, V] float32 copy of bf16/fp16 logits. On CUDA both passes run as
torch.compile'd kernels from `amid.fused`, which also uses the pieces here for its LM-head path.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["student_bins", "BinGrads", "bin_grads", "dense_tail_grad_", "scaled", "compute_dtype", "row_chunks"]


def compute_dtype(t: Tensor) -> torch.dtype:
    """The arithmetic dtype for tensors of t's dtype: the wider of float32 and t's."""
    return torch.promote_types(t.dtype, torch.float32)


CHUNK_ELEMENTS = 1 << 23  # ~32 MiB of float32 per chunk of rows


def row_chunks(n: int, v: int):
    rows = max(1, CHUNK_ELEMENTS // max(v, 1))
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def scaled(z: Tensor, s: float) -> Tensor:
    # s·z with −inf kept −inf (masked vocabulary entries and the excluded top-k), for any s.
    return torch.where(torch.isneginf(z), z, z * s)


class BinGrads(NamedTuple):
    """dL/dz of the student bins, in factored form (one row per position):

        dL/dz_j = g_top[j]                                     j ∈ S
                = coef · exp(z_j − lse_tail) + gs · exp(s·z_j − lse_s_tail)      j ∉ S

    lse_tail / lse_s_tail are 0 where the row has no tail (coef and gs are 0 there)."""

    g_top: Tensor  # [N, k]
    coef: Tensor  # [N]
    lse_tail: Tensor  # [N]
    gs: Tensor | None  # [N], only with the α-β tail weight
    lse_s_tail: Tensor | None  # [N]

    def rows(self, rows: slice) -> "BinGrads":
        return BinGrads(*(None if t is None else t[rows] for t in self))

    def scaled(self, w: Tensor) -> "BinGrads":
        """The gradient of Σ_i w_i·L_i instead of Σ_i L_i (w: [N])."""
        return BinGrads(
            self.g_top * w[:, None],
            self.coef * w,
            self.lse_tail,
            None if self.gs is None else self.gs * w,
            self.lse_s_tail,
        )


def bin_grads(
    g_s: Tensor,
    g_tail: Tensor,
    g_gamma: Tensor,
    lse_tail: Tensor,
    lse_s_tail: Tensor,
    log_q_s: Tensor,
    log_q_tail: Tensor,
    s: float | None,
) -> BinGrads:
    """Chain rule from the bins' gradients (g_s, g_tail, g_gamma) to the logits, factored."""
    dtype = log_q_s.dtype
    g_s = g_s.to(dtype)
    g_tail = g_tail.to(dtype)
    # dL/dz_j = g_S[j] − q_j·G              for j ∈ S
    #         = π_j · (g_tail − G·q_tail)     for j ∉ S, π_j = q_j / q_tail = exp(z_j − lse_tail) ≤ 1
    #           + g_γ·s·(π^(s)_j − π_j)       (α-β tail weight), π^(s) = softmax over the tail of s·z
    big_g = g_s.sum(dim=1) + g_tail
    has_tail = torch.isfinite(lse_tail)
    zero = torch.zeros_like(lse_tail)
    q_tail = torch.where(has_tail, log_q_tail.exp(), zero)
    coef = torch.where(has_tail, g_tail - big_g * q_tail, zero)
    g_top = g_s - log_q_s.exp() * big_g[:, None]
    gs = lse_s = None
    if s is not None:
        gs = torch.where(has_tail, g_gamma.to(dtype) * s, zero)
        coef = coef - gs
        lse_s = torch.where(has_tail, lse_s_tail, zero)
    return BinGrads(g_top, coef, torch.where(has_tail, lse_tail, zero), gs, lse_s)


def dense_tail_grad_(z: Tensor, bg: BinGrads, s: float | None) -> Tensor:
    """In place on z (compute dtype): coef·exp(z − lse_tail) [+ gs·exp(s·z − lse_s_tail)]."""
    extra = None
    if s is not None:
        extra = scaled(z, s).sub_(bg.lse_s_tail[:, None]).exp_().mul_(bg.gs[:, None])
    out = z.sub_(bg.lse_tail[:, None]).exp_().mul_(bg.coef[:, None])
    return out if extra is None else out.add_(extra)


def _fast_path(t: Tensor) -> bool:
    """Whether the compiled (torch.compile) student-side kernels serve this tensor."""
    from amid import fused  # late import: amid.fused builds on this module

    return fused.compiled_kernels_enabled(t)


class _StudentBins(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, s: float | None):  # type: ignore[override]
        n, v = logits.shape
        dtype = compute_dtype(logits)
        fast = _fast_path(logits)
        if fast:
            from amid import fused

            try:
                log_q_s, lse_tail, lse_s_tail, log_q_tail, log_gamma = fused.logit_stats(logits, ids, s, dtype)
            except fused._CompileFailed:
                fast = False
        if not fast:
            log_q_s = torch.empty(ids.shape, dtype=dtype, device=logits.device)
            lse = torch.empty(n, dtype=dtype, device=logits.device)
            lse_tail = torch.empty_like(lse)
            lse_s_tail = torch.zeros_like(lse)
            for rows in row_chunks(n, v):
                z = logits[rows].to(dtype, copy=True)
                idx = ids[rows]
                z_s = z.gather(1, idx)
                z.scatter_(1, idx, -math.inf)
                lse_tail[rows] = torch.logsumexp(z, dim=1)
                lse[rows] = torch.logaddexp(torch.logsumexp(z_s, dim=1), lse_tail[rows])
                log_q_s[rows] = z_s - lse[rows, None]
                if s is not None:
                    lse_s_tail[rows] = torch.logsumexp(scaled(z, s), dim=1)
            has_tail = torch.isfinite(lse_tail)
            log_q_tail = torch.where(has_tail, lse_tail - lse, torch.full_like(lse, -math.inf))
            log_gamma = torch.zeros_like(lse)
            if s is not None:
                log_gamma = torch.where(has_tail, lse_s_tail - s * lse_tail, log_gamma)
        ctx.s = s
        ctx.fast = fast
        ctx.save_for_backward(logits, ids, lse_tail, lse_s_tail, log_q_s, log_q_tail)
        return log_q_s, log_q_tail, log_gamma

    @staticmethod
    def backward(ctx, g_s: Tensor, g_tail: Tensor, g_gamma: Tensor):  # type: ignore[override]
        logits, ids, lse_tail, lse_s_tail, log_q_s, log_q_tail = ctx.saved_tensors
        s = ctx.s
        n, v = logits.shape
        dtype = lse_tail.dtype
        if ctx.fast:
            from amid import fused

            bg = fused.compiled_bin_grads(g_s, g_tail, g_gamma, lse_tail, lse_s_tail, log_q_s, log_q_tail, s)
            try:
                return fused.logit_grad(logits, ids, bg, s, dtype), None, None
            except fused._CompileFailed:
                pass
        else:
            bg = bin_grads(g_s, g_tail, g_gamma, lse_tail, lse_s_tail, log_q_s, log_q_tail, s)
        grad = torch.empty_like(logits)
        for rows in row_chunks(n, v):
            out = dense_tail_grad_(logits[rows].to(dtype, copy=True), bg.rows(rows), s)
            out.scatter_(1, ids[rows], bg.g_top[rows])
            grad[rows] = out
        return grad, None, None


def student_bins(logits: Tensor, topk_ids: Tensor, s: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Student log-probabilities on the top-k bins and the tail bin, from full logits.

    Args:
        logits: [N, V] any float dtype (kept as is; chunks are upcast on the fly).
        topk_ids: [N, k] integer ids, distinct per row.
        s: if given, also the log of the tail weight γ = Σ_{x∉S} (q(x)/q_tail)^s.

    Returns:
        (log q(S) [N, k], log q_tail [N], log γ [N] (zeros if s is None)) in the compute dtype.
        log q_tail is computed as a logsumexp over the complement of S, so it is exact even when
        the top-k hold almost all the mass.
    """
    return _StudentBins.apply(logits, topk_ids.long(), s)

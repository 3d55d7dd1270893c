"""The student side of the sparse loss: its k + 1 bins from [N, V] logits, and their gradient.

`student_bins(logits, topk_ids, s)` returns log q(S) [N, k], log q_tail [N] (a logsumexp over
the complement of the top-k S, exact even when S holds almost all the mass) and, for the α-β
divergence, log γ = log Σ_{x∉S} (q(x)/q_tail)^s. It is a custom autograd function: the forward
reads the logits chunk by chunk; the backward writes dL/dlogits in place from the bins'
gradients in a factored form (`BinGrads`): for j ∈ S a per-entry value, for j ∉ S
coef · exp(z_j − m − lse_tail) [+ gs · exp(s·(z_j − m) − lse_s_tail)]. No autograd graph over
[N, V] intermediates, no [N, V] float32 copy of bf16/fp16 logits. On CUDA both passes run as
torch.compile'd kernels from `amid.fused`, which also uses the pieces here for its LM-head path.

Every tail statistic is kept relative to a shift m, the row's largest tail logit (`RowStats`),
and log q(S) is taken around the row's largest logit, as `log_softmax` takes it: the terms are
O(log V) whatever the logits' common offset or the top-k's lead over the tail, so log q(S),
log q_tail and the gradient keep the dtype's relative accuracy (an absolute logsumexp near
z ≈ 1e4 has an ulp of 1e-3 in float32, and every bin and every tail gradient inherited it).
log q_tail is −log(1 + exp(lse(S) − lse_tail)), accurate to its last bits when the student's
tail holds nearly all the mass (a difference of two O(log V) numbers kept only their ulp there).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "student_bins",
    "RowStats",
    "BinGrads",
    "bin_grads",
    "compute_dtype",
    "eager_logit_stats",
    "eager_dense_grad",
    "eager_logit_grad",
]


def compute_dtype(t: Tensor) -> torch.dtype:
    """The arithmetic dtype for tensors of t's dtype: the wider of float32 and t's."""
    return torch.promote_types(t.dtype, torch.float32)


# Logits per chunk of rows. On the CPU a chunk small enough to stay in cache (4 MiB of float32)
# makes the passes after the first nearly free; on a GPU (eager kernels: the compiled ones are
# off, or the teacher's statistics in amid.teacher) fewer, larger chunks keep the launches few:
# a chunk is ~15 kernels over one or two scratch buffers of its size (128 MiB in float32; the
# rare s ≤ 0 tail weight adds a few temporaries).
CHUNK_ELEMENTS = 1 << 25
CPU_CHUNK_ELEMENTS = 1 << 20


def chunk_rows(v: int, device: torch.device) -> int:
    """Rows of width v in one chunk on `device`."""
    budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else CHUNK_ELEMENTS
    return max(1, budget // max(v, 1))


def row_chunks(n: int, v: int, device: torch.device):
    """Slices of at most one chunk's worth of rows of an [n, v] tensor on `device`."""
    step = chunk_rows(v, device)
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def scaled(z: Tensor, s: float) -> Tensor:
    # s·z with −inf kept −inf (masked vocabulary entries and the excluded top-k), for any s.
    return torch.where(torch.isneginf(z), z, z * s)


class RowStats(NamedTuple):
    """The student side of one batch of rows, from their logits z [N, V] (compute dtype):

        shift       m = max_{j∉S} z_j (max_{j∈S} z_j for a row without a tail, 0 if none)
        lse_tail    log Σ_{j∉S} exp(z_j − m)          (−inf: no tail)
        lse_s_tail  log Σ_{j∉S} exp(s·(z_j − m))      (0 without s)
        log_q_s, log_q_tail, log_gamma: the bins `student_bins` returns.
    """

    log_q_s: Tensor  # [N, k]
    shift: Tensor  # [N]
    lse_tail: Tensor  # [N]
    lse_s_tail: Tensor  # [N]
    log_q_tail: Tensor  # [N]
    log_gamma: Tensor  # [N]

    def bins(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.log_q_s, self.log_q_tail, self.log_gamma


class BinGrads(NamedTuple):
    """dL/dz of the student bins, in factored form (one row per position):

        dL/dz_j = g_top[j]                                                     j ∈ S
                = coef · exp(z_j − m − lse_tail) + gs · exp(s·(z_j − m) − lse_s_tail)   j ∉ S

    with m = `shift` and the sums relative to it (`RowStats`); shift, lse_tail and lse_s_tail
    are 0 where the row has no tail (coef and gs are 0 there)."""

    g_top: Tensor  # [N, k]
    coef: Tensor  # [N]
    shift: Tensor  # [N]
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
            self.shift,
            self.lse_tail,
            None if self.gs is None else self.gs * w,
            self.lse_s_tail,
        )


def bin_grads(
    g_s: Tensor,
    g_tail: Tensor,
    g_gamma: Tensor,
    shift: Tensor,
    lse_tail: Tensor,
    lse_s_tail: Tensor,
    log_q_s: Tensor,
    log_q_tail: Tensor,
    s: float | None,
) -> BinGrads:
    """Chain rule from the bins' gradients (g_s, g_tail, g_gamma) to the logits, factored
    (shift, lse_tail, lse_s_tail as in `RowStats`)."""
    dtype = log_q_s.dtype
    g_s = g_s.to(dtype)
    g_tail = g_tail.to(dtype)
    # dL/dz_j = g_S[j] − q_j·G              for j ∈ S
    #         = π_j · (g_tail − G·q_tail)     for j ∉ S, π_j = q_j / q_tail = exp(z_j − m − lse_tail) ≤ 1
    #           + g_γ·s·(π^(s)_j − π_j)       (α-β tail weight), π^(s) = softmax over the tail of s·z
    # with G = Σ g_S + g_tail. The tail coefficient is formed as g_tail·q(S) − q_tail·Σ g_S: where
    # the student's tail holds nearly all its mass (q_tail → 1, early in training), g_tail − G·q_tail
    # cancels two O(g_tail) numbers and kept only ulp(g_tail) / (1 − q_tail) of relative accuracy.
    sum_g_s = g_s.sum(dim=1)
    big_g = sum_g_s + g_tail
    has_tail = torch.isfinite(lse_tail)
    zero = torch.zeros_like(lse_tail)
    q_s = log_q_s.exp()
    q_tail = torch.where(has_tail, log_q_tail.exp(), zero)
    coef = torch.where(has_tail, g_tail * q_s.sum(dim=1) - q_tail * sum_g_s, zero)
    g_top = g_s - q_s * big_g[:, None]
    gs = lse_s = None
    if s is not None:
        gs = torch.where(has_tail, g_gamma.to(dtype) * s, zero)
        coef = coef - gs
        lse_s = torch.where(has_tail, lse_s_tail, zero)
    return BinGrads(g_top, coef, torch.where(has_tail, shift, zero), torch.where(has_tail, lse_tail, zero), gs, lse_s)


LOG2E = 1.4426950408889634  # 1 / ln 2


def _exp_(t: Tensor) -> Tensor:
    # exp(t) in place. On the CPU as 2^(t·log2 e): torch.exp2 runs 4-5x faster than torch.exp
    # there (dev VM's EPYC); rounding t·log2 e adds ~|t|·eps relative error, what the rounding of
    # t itself already carries. On a GPU exp is as fast and the multiply would be one more pass.
    return t.mul_(LOG2E).exp2_() if t.device.type == "cpu" else t.exp_()


def row_shift(tail_max: Tensor, z_s: Tensor) -> Tensor:
    """`RowStats.shift` from the rows' largest tail logit [R] and top-k logits [R, k]."""
    if z_s.shape[1]:
        tail_max = torch.where(torch.isfinite(tail_max), tail_max, z_s.amax(dim=1))
    return torch.where(torch.isfinite(tail_max), tail_max, torch.zeros_like(tail_max))


def tail_stats_(z: Tensor, ids: Tensor, s: float | None, work: Tensor | None = None) -> tuple[Tensor, ...]:
    """Row statistics of one chunk of logits z [R, V] (compute dtype; owned: overwritten).

    Returns (z_S [R, k], m [R], lse_tail [R], lse_s_tail [R] (zeros without s)): the top-k
    logits, the shift and the logsumexp of z − m (of s·(z − m)) over the complement of the top-k, exact
    however small the tail (`RowStats`). For s None or s > 0 every pass works in place on z (and
    on `work`, scratch of z's shape for the s·z sum), so a chunk that fits in cache costs about
    one read of it; s ≤ 0 (rare) takes a plain logsumexp with temporaries.
    """
    z_s = z.gather(1, ids)
    z.scatter_(1, ids, -math.inf)
    m = row_shift(z.amax(dim=1), z_s)
    z.sub_(m[:, None])
    lse_s_tail = torch.zeros_like(m)
    if s is not None:
        if s > 0:  # max of s·(z − m) over the tail is 0: no second max pass
            lse_s_tail = torch.mul(z, s * LOG2E, out=_like(work, z)).exp2_().sum(dim=1).log_()
        else:
            lse_s_tail = torch.logsumexp(scaled(z, s), dim=1)
    lse_tail = _exp_(z).sum(dim=1).log_()
    return z_s, m, lse_tail, lse_s_tail


def dense_tail_grad(z: Tensor, bg: BinGrads, s: float | None, out: Tensor, work: Tensor | None = None) -> Tensor:
    """out = coef·exp(z − m − lse_tail) [+ gs·exp(s·(z − m) − lse_s_tail)] elementwise (`BinGrads`),
    z [R, W] any float dtype, out [R, W] in the compute dtype (may be z itself), `work` optional
    scratch like out (used for s > 0). Top-k entries get meaningless values (inf or nan, even:
    their z − m may be large): the caller overwrites them."""
    # Exact near m (Sterbenz); ≤ 0 on the tail up to the rounding of logits recomputed by another
    # matmul (the fused backward's vocabulary blocks).
    torch.sub(z, bg.shift[:, None], out=out)
    extra = None
    if s is not None:
        if s > 0:
            extra = torch.add(bg.lse_s_tail.mul(-LOG2E)[:, None], out, alpha=s * LOG2E, out=_like(work, out))
            extra.exp2_()
        else:  # scaled() keeps −inf entries at −inf for these s
            extra = scaled(out, s).sub_(bg.lse_s_tail[:, None]).exp_()
    # exp(z − m)·(coef·e^(−lse_tail)): one pass fewer than subtracting lse_tail elementwise, and
    # e^(−lse_tail) ≥ 1/V cannot underflow.
    _exp_(out).mul_((bg.coef * torch.exp(-bg.lse_tail))[:, None])
    return out if extra is None else out.addcmul_(extra, bg.gs[:, None])


def _like(work: Tensor | None, t: Tensor) -> Tensor:
    # Scratch the shape and dtype of t: `work` (a buffer at least as long) or a new tensor.
    return torch.empty_like(t) if work is None else work[: t.shape[0]]


def _fast_path(t: Tensor) -> bool:
    """Whether the compiled (torch.compile) student-side kernels serve this tensor."""
    from amid import fused  # late import: amid.fused builds on this module

    return fused.compiled_kernels_enabled(t)


def chunk_bins(z: Tensor, ids: Tensor, s: float | None, work: Tensor | None = None) -> RowStats:
    """`RowStats` of one chunk z [R, V] (compute dtype; owned: overwritten by `tail_stats_`, as
    is the optional scratch `work`)."""
    return finish_stats(*tail_stats_(z, ids, s, work), s)


def finish_stats(z_s: Tensor, m: Tensor, lse_tail: Tensor, lse_s_tail: Tensor, s: float | None) -> RowStats:
    """`RowStats` from the top-k logits z_s [R, k] (compute dtype), the shift and the tail sums."""
    has_tail = torch.isfinite(lse_tail)
    # log q(S) around the row's largest logit M, as log_softmax takes it: every term O(log V) even
    # when the top-k stand far above the tail (a confident student; around m they would be O(gap)).
    top = z_s.amax(dim=1) if z_s.shape[1] else torch.full_like(m, -math.inf)
    big = torch.where(torch.isfinite(top), torch.maximum(top, m), m)
    e_top = z_s - big[:, None]
    lse_top = torch.logsumexp(e_top, dim=1)
    lse_rest = lse_tail + (m - big)
    lse = torch.logaddexp(lse_top, lse_rest)
    # log q_tail = −log(1 + Σ_S q / q_tail): no cancellation of two O(log V) numbers; logaddexp, not
    # softplus, whose cut-off at 20 drops up to 2e-9 (float64's digits).
    log_q_tail = torch.where(has_tail, -torch.logaddexp(torch.zeros_like(lse), lse_top - lse_rest), -math.inf)
    log_gamma = torch.zeros_like(lse)
    if s is not None:
        log_gamma = torch.where(has_tail, lse_s_tail - s * lse_tail, log_gamma)
    return RowStats(e_top - lse[:, None], m, lse_tail, lse_s_tail, log_q_tail, log_gamma)


def _chunk_buffer(logits: Tensor, dtype: torch.dtype) -> Tensor:
    # One scratch buffer serves every chunk: allocated once, and it stays in cache.
    n, v = logits.shape
    return torch.empty(min(n, chunk_rows(v, logits.device)), v, dtype=dtype, device=logits.device)


def eager_logit_stats(logits: Tensor, ids: Tensor, s: float | None, dtype: torch.dtype) -> RowStats:
    """`chunk_bins` of every row of logits [N, V], chunk by chunk (eager PyTorch)."""
    n, v = logits.shape
    buf = _chunk_buffer(logits, dtype)
    work = _chunk_buffer(logits, dtype) if s is not None and s > 0 else None
    parts = [
        chunk_bins(buf[: rows.stop - rows.start].copy_(logits[rows]), ids[rows], s, work)
        for rows in row_chunks(n, v, logits.device)
    ]
    if len(parts) <= 1:
        return parts[0] if parts else chunk_bins(buf[:0], ids, s, work)  # N = 0: empty outputs
    return RowStats(*(torch.cat(p) for p in zip(*parts)))


def eager_dense_grad(z: Tensor, bg: BinGrads, s: float | None, dtype: torch.dtype, out: Tensor) -> Tensor:
    """`dense_tail_grad` of every row of z [N, W] into out [N, W] (any float dtype; may be z
    itself), chunk by chunk in the compute dtype `dtype`. Top-k columns are left for the caller."""
    n, w = z.shape
    direct = out.dtype == dtype  # write straight into out, no scratch
    buf = None if direct else _chunk_buffer(z, dtype)
    work = _chunk_buffer(z, dtype) if s is not None and s > 0 else None
    for rows in row_chunks(n, w, z.device):
        o = out[rows] if direct else buf[: rows.stop - rows.start]
        dense_tail_grad(z[rows], bg.rows(rows), s, o, work)
        if not direct:
            out[rows] = o
    return out


def eager_logit_grad(logits: Tensor, ids: Tensor, bg: BinGrads, s: float | None, dtype: torch.dtype) -> Tensor:
    """dL/dlogits [N, V] in the logits' dtype from the factored gradient (eager PyTorch)."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    eager_dense_grad(logits, bg, s, dtype, grad)
    return grad.scatter_(1, ids, bg.g_top.to(grad.dtype))


class _StudentBins(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, s: float | None):  # type: ignore[override]
        dtype = compute_dtype(logits)
        fast = _fast_path(logits)
        if fast:
            from amid import fused

            try:
                stats = fused.logit_stats(logits, ids, s, dtype)
            except fused._CompileFailed:
                fast = False
        if not fast:
            stats = eager_logit_stats(logits, ids, s, dtype)
        ctx.s = s
        ctx.fast = fast
        ctx.save_for_backward(logits, ids, stats.shift, stats.lse_tail, stats.lse_s_tail, stats.log_q_s,
                              stats.log_q_tail)
        return stats.bins()

    @staticmethod
    def backward(ctx, g_s: Tensor, g_tail: Tensor, g_gamma: Tensor):  # type: ignore[override]
        logits, ids, *stats = ctx.saved_tensors
        s = ctx.s
        dtype = stats[0].dtype
        if ctx.fast:
            from amid import fused

            bg = fused.compiled_bin_grads(g_s, g_tail, g_gamma, *stats, s)
            try:
                return fused.logit_grad(logits, ids, bg, s, dtype), None, None
            except fused._CompileFailed:
                pass
        else:
            bg = bin_grads(g_s, g_tail, g_gamma, *stats, s)
        return eager_logit_grad(logits, ids, bg, s, dtype), None, None


def check_distinct(topk_ids: Tensor) -> None:
    """ValueError if a row of `topk_ids` [N, k] names an id twice (the bins would overlap: the
    forward would count that logit twice and the backward once). One host sync."""
    if topk_ids.shape[-1] < 2 or topk_ids.numel() == 0:
        return
    ordered = topk_ids.sort(dim=-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=-1)
    if bool(repeated.any()):
        row = int(repeated.nonzero()[0, 0])
        raise ValueError(f"topk_ids row {row} names an id twice: the top-k ids of a position must be distinct")


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

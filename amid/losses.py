"""The AMiD objective: one configuration, two entry points (SPEC §3–§4).

- `full_loss`: the full-vocabulary objective, what an online teacher gives. The reference.
- `sparse_loss`: the (k + 1)-bin objective from a cached top-k teacher with its exact tail
  mass. The student side is computed by `student_bins`, a custom autograd function that reads
  the [N, V] logits chunk by chunk and writes their gradient in place: no autograd graph over
  [N, V] intermediates, no [N, V] float32 copy when the logits are bf16/fp16. On CUDA its two
  passes over the logits (and the [N, k + 1] objective, `bins_loss`) run as torch.compile'd
  kernels from `amid.fused`; `amid.fused.fused_sparse_loss` goes one step further and never
  builds the logits at all.

Both return the per-position loss, shape [N]; masking and averaging are the caller's.
Arithmetic runs in the wider of float32 and the logits' dtype.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from amid import divergences as D
from amid.mixture import log_alpha_mixture

__all__ = [
    "LossConfig",
    "PRESETS",
    "full_loss",
    "sparse_loss",
    "bins_loss",
    "tail_weight_degree",
    "student_bins",
    "mix_ce",
]

ORDERS = ("pr", "rp", "qr", "rq")
TAIL_MODES = ("bucket", "bucket_unweighted", "renorm")

# Presets are data: each is a set of LossConfig overrides of the one machinery (SPEC §3).
PRESETS: dict[str, dict[str, Any]] = {
    # KL(p ‖ q): λ = 0 makes r = q.
    "kd": dict(lam=0.0, order="pr", divergence="kl"),
    # KL(q ‖ p): λ = 1 makes r = p.
    "rkl": dict(lam=1.0, order="qr", divergence="kl"),
    # DistiLLM skew KL: KL(p ‖ 0.1 p + 0.9 q).
    "skl": dict(alpha=-1.0, lam=0.1, order="pr", divergence="kl"),
    # DistiLLM skew reverse KL: KL(q ‖ 0.9 p + 0.1 q).
    "srkl": dict(alpha=-1.0, lam=0.9, order="qr", divergence="kl"),
    # GKD's generalised JSD_β(p, q); r = q so D(p, r) = JSD_β(p, q).
    "gkd": dict(lam=0.0, order="pr", divergence="jsd", jsd_beta=0.5),
    # TAID: KL(r ‖ q), r ∝ p^t q^(1−t) with q detached; t rises linearly from lam to lam_end.
    "taid": dict(alpha=1.0, lam=0.4, lam_end=1.0, order="rq", divergence="kl", stop_grad_r=True),
    # ABKD: D_AB(p ‖ q) with (a, b) = (0.2, 0.7).
    "abkd": dict(lam=0.0, order="pr", divergence="ab", ab_alpha=0.2, ab_beta=0.7),
    # AMiD: any α, λ, order and divergence; these are the defaults a sweep starts from.
    "amid": dict(alpha=0.5, lam=0.1, order="pr", divergence="kl"),
    # Plain supervised fine-tuning on the ground-truth tokens (no distillation term).
    "ce": dict(lam=0.0, order="pr", divergence="kl", ce_weight=1.0),
}


@dataclass(frozen=True)
class LossConfig:
    """The distillation objective.

    alpha, lam: shape and teacher weight of the α-mixture r (SPEC §2).
    divergence: "kl" | "ab" (α-β, parameters ab_alpha, ab_beta) | "tv" | "jsd" (jsd_beta).
    order: which pair D is taken on: "pr" D(p, r), "rp" D(r, p), "qr" D(q, r), "rq" D(r, q).
    stop_grad_r: compute r from a detached student (TAID).
    tail: "bucket" (SPEC §4 tail bin, γ-weighted for α-β), "bucket_unweighted", or "renorm"
        (drop the tail and renormalise the top-k: biased, for comparison only).
    ce_weight: w in (1 − w)·KD + w·CE on ground-truth tokens; applied by `mix_ce` / the trainer.
    lam_end: if set, λ moves linearly from `lam` to `lam_end` over training (TAID's schedule);
        `at_progress` gives the configuration at a point of training.
    name: the preset this came from, for logs and tables.
    """

    alpha: float = 0.5
    lam: float = 0.1
    divergence: str = "kl"
    order: str = "pr"
    ab_alpha: float = 0.2
    ab_beta: float = 0.7
    jsd_beta: float = 0.5
    stop_grad_r: bool = False
    tail: str = "bucket"
    ce_weight: float = 0.0
    lam_end: float | None = None
    name: str = "amid"

    def __post_init__(self) -> None:
        if self.divergence not in D.DIVERGENCES:
            raise ValueError(
                f"unknown divergence {self.divergence!r}; choose one of {', '.join(D.DIVERGENCES)}"
            )
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}; choose one of {', '.join(ORDERS)}")
        if self.tail not in TAIL_MODES:
            raise ValueError(f"unknown tail mode {self.tail!r}; choose one of {', '.join(TAIL_MODES)}")
        for field in ("lam", "jsd_beta", "ce_weight") + (("lam_end",) if self.lam_end is not None else ()):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{field} must be in [0, 1], got {value}")
        if math.isnan(self.alpha):
            raise ValueError("alpha must be a number, got nan")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LossConfig":
        """A named method (kd, rkl, skl, srkl, gkd, taid, abkd, amid, ce) with optional overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    def at_progress(self, progress: float) -> "LossConfig":
        """The configuration at fraction `progress` ∈ [0, 1] of training (λ schedule applied)."""
        if self.lam_end is None:
            return self
        progress = min(max(progress, 0.0), 1.0)
        return dataclasses.replace(self, lam=self.lam + (self.lam_end - self.lam) * progress)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _normalise(log_x: Tensor) -> Tensor:
    return log_x - torch.logsumexp(log_x, dim=-1, keepdim=True)


def _divergence(log_a: Tensor, log_b: Tensor, cfg: LossConfig, weight: Tensor | None) -> Tensor:
    if cfg.divergence == "kl":
        return D.kl(log_a, log_b, weight)
    if cfg.divergence == "ab":
        return D.alpha_beta(log_a, log_b, cfg.ab_alpha, cfg.ab_beta, weight)
    if cfg.divergence == "tv":
        return D.total_variation(log_a, log_b, weight)
    return D.jensen_shannon(log_a, log_b, cfg.jsd_beta, weight)


def _objective(log_p: Tensor, log_q: Tensor, cfg: LossConfig, weight: Tensor | None = None) -> Tensor:
    """D on the chosen order of (p, q, r) over the last dimension; [..., K] → [...]."""
    log_q_in_r = log_q.detach() if cfg.stop_grad_r else log_q
    log_r = log_alpha_mixture(log_p, log_q_in_r, cfg.alpha, cfg.lam)
    first, second = {
        "pr": (log_p, log_r),
        "rp": (log_r, log_p),
        "qr": (log_q, log_r),
        "rq": (log_r, log_q),
    }[cfg.order]
    return _divergence(first, second, cfg, weight)


def full_loss(student_logits: Tensor, teacher_logits: Tensor, config: LossConfig) -> Tensor:
    """Full-vocabulary AMiD loss per position.

    Args:
        student_logits: [N, V], any float dtype; gradients flow into it.
        teacher_logits: [N, V], any float dtype; treated as a constant.
        config: the objective.

    Returns:
        [N] loss in float32 (float64 if the student logits are float64).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    dtype = _compute_dtype(student_logits)
    log_q = F.log_softmax(student_logits.to(dtype), dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().to(dtype), dim=-1)
    return _objective(log_p, log_q, config)


def sparse_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    config: LossConfig,
) -> Tensor:
    """The (k + 1)-bin AMiD loss per position against a cached top-k teacher (SPEC §4).

    Args:
        student_logits: [N, V] any float dtype. V may exceed the teacher's vocabulary (padded
            student vocabularies): every logit outside `topk_ids` counts toward the tail.
        topk_ids: [N, k] integer, distinct per row.
        topk_logprobs: [N, k] teacher log-probabilities of those ids under its full softmax.
        tail_logmass: [N] teacher log(1 − Σ_{x∈S} p(x)); −inf if the top-k hold all the mass.
        config: the objective.

    Returns:
        [N] loss in float32 (float64 if the student logits are float64).
    """
    n, k = topk_ids.shape
    if student_logits.dim() != 2 or student_logits.shape[0] != n:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} do not match topk_ids {tuple(topk_ids.shape)}"
        )
    if topk_logprobs.shape != (n, k) or tail_logmass.shape != (n,):
        raise ValueError(
            f"topk_logprobs {tuple(topk_logprobs.shape)} / tail_logmass {tuple(tail_logmass.shape)}"
            f" must be [{n}, {k}] / [{n}]"
        )
    s = tail_weight_degree(config)
    log_q_s, log_q_tail, log_gamma = student_bins(student_logits, topk_ids, s)
    return bins_loss(log_q_s, log_q_tail, log_gamma, topk_logprobs, tail_logmass, config)


def tail_weight_degree(config: LossConfig) -> float | None:
    """The exponent s of the tail weight γ (SPEC §4), or None when the objective needs no γ.

    γ is needed only for the bucket tail of a divergence that is not homogeneous of degree 1
    (the α-β divergence with a_ + b_ ≠ 1)."""
    deg = D.degree(config.divergence, config.ab_alpha, config.ab_beta)
    return deg if config.tail == "bucket" and deg != 1.0 else None


def bins_loss(
    log_q_s: Tensor,
    log_q_tail: Tensor,
    log_gamma: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    config: LossConfig,
) -> Tensor:
    """The (k + 1)-bin objective from the student's bins, per position (plain autograd, [N, k+1]).

    The shared second half of `sparse_loss` and `amid.fused.fused_sparse_loss`: the student side
    (log q(S) [N, k], log q_tail [N], log γ [N], as `student_bins` returns them) comes from
    the logits or from the LM head; everything here is only k + 1 wide. `log_gamma` is used
    only when `tail_weight_degree(config)` is not None.

    On CUDA (with `amid.fused`'s compiled kernels on) the whole objective, forward and backward,
    runs through torch.compile: a few fused kernels instead of ~200 small launches.
    """
    from amid import fused  # late import: amid.fused builds on this module

    out = fused.compiled_objective(log_q_s, log_q_tail, log_gamma, topk_logprobs, tail_logmass, config)
    if out is not None:
        return out
    return _bins_loss_eager(log_q_s, log_q_tail, log_gamma, topk_logprobs, tail_logmass, config)


def _bins_loss_eager(
    log_q_s: Tensor,
    log_q_tail: Tensor,
    log_gamma: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    config: LossConfig,
) -> Tensor:
    dtype = log_q_s.dtype
    log_p_s = topk_logprobs.detach().to(dtype)

    if config.tail == "renorm":
        return _objective(_normalise(log_p_s), _normalise(log_q_s), config)

    # Cached values carry storage rounding; renormalise the teacher's k + 1 bins so they sum to 1.
    log_p = _normalise(torch.cat([log_p_s, tail_logmass.detach().to(dtype)[:, None]], dim=-1))
    log_q = torch.cat([log_q_s, log_q_tail[:, None]], dim=-1)
    weight = None
    if tail_weight_degree(config) is not None:
        weight = torch.cat([torch.ones_like(log_q_s), log_gamma.exp()[:, None]], dim=-1)
    return _objective(log_p, log_q, config, weight)


def mix_ce(kd: Tensor, ce: Tensor, config: LossConfig) -> Tensor:
    """(1 − w)·KD + w·CE with w = config.ce_weight; skips a term whose weight is 0."""
    w = config.ce_weight
    if w == 0.0:
        return kd
    if w == 1.0:
        return ce
    return (1.0 - w) * kd + w * ce


# ----------------------------------------------------------------------------------------------
# Student side of the sparse loss: log q(S), log q_tail and the α-β tail weight log γ.

_CHUNK_ELEMENTS = 1 << 23  # ~32 MiB of float32 per chunk of rows


def _row_chunks(n: int, v: int):
    rows = max(1, _CHUNK_ELEMENTS // max(v, 1))
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def _scaled(z: Tensor, s: float) -> Tensor:
    # s·z with −inf kept −inf (masked vocabulary entries and the excluded top-k), for any s.
    return torch.where(torch.isneginf(z), z, z * s)


class _BinGrads(NamedTuple):
    """dL/dz of the student bins, in factored form (one row per position):

        dL/dz_j = g_top[j]                                     j ∈ S
                = coef · exp(z_j − lse_tail) + gs · exp(s·z_j − lse_s_tail)      j ∉ S

    lse_tail / lse_s_tail are 0 where the row has no tail (coef and gs are 0 there)."""

    g_top: Tensor  # [N, k]
    coef: Tensor  # [N]
    lse_tail: Tensor  # [N]
    gs: Tensor | None  # [N], only with the α-β tail weight
    lse_s_tail: Tensor | None  # [N]

    def rows(self, rows: slice) -> "_BinGrads":
        return _BinGrads(*(None if t is None else t[rows] for t in self))

    def scaled(self, w: Tensor) -> "_BinGrads":
        """The gradient of Σ_i w_i·L_i instead of Σ_i L_i (w: [N])."""
        return _BinGrads(
            self.g_top * w[:, None],
            self.coef * w,
            self.lse_tail,
            None if self.gs is None else self.gs * w,
            self.lse_s_tail,
        )


def _bin_grads(
    g_s: Tensor,
    g_tail: Tensor,
    g_gamma: Tensor,
    lse_tail: Tensor,
    lse_s_tail: Tensor,
    log_q_s: Tensor,
    log_q_tail: Tensor,
    s: float | None,
) -> _BinGrads:
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
    return _BinGrads(g_top, coef, torch.where(has_tail, lse_tail, zero), gs, lse_s)


def _dense_tail_grad_(z: Tensor, bg: _BinGrads, s: float | None) -> Tensor:
    """In place on z (compute dtype): coef·exp(z − lse_tail) [+ gs·exp(s·z − lse_s_tail)]."""
    extra = None
    if s is not None:
        extra = _scaled(z, s).sub_(bg.lse_s_tail[:, None]).exp_().mul_(bg.gs[:, None])
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
        dtype = _compute_dtype(logits)
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
            for rows in _row_chunks(n, v):
                z = logits[rows].to(dtype, copy=True)
                idx = ids[rows]
                z_s = z.gather(1, idx)
                z.scatter_(1, idx, -math.inf)
                lse_tail[rows] = torch.logsumexp(z, dim=1)
                lse[rows] = torch.logaddexp(torch.logsumexp(z_s, dim=1), lse_tail[rows])
                log_q_s[rows] = z_s - lse[rows, None]
                if s is not None:
                    lse_s_tail[rows] = torch.logsumexp(_scaled(z, s), dim=1)
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

            bg = fused.bin_grads(g_s, g_tail, g_gamma, lse_tail, lse_s_tail, log_q_s, log_q_tail, s)
            try:
                return fused.logit_grad(logits, ids, bg, s, dtype), None, None
            except fused._CompileFailed:
                pass
        else:
            bg = _bin_grads(g_s, g_tail, g_gamma, lse_tail, lse_s_tail, log_q_s, log_q_tail, s)
        grad = torch.empty_like(logits)
        for rows in _row_chunks(n, v):
            out = _dense_tail_grad_(logits[rows].to(dtype, copy=True), bg.rows(rows), s)
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

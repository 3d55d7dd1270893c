"""The AMiD objective: one configuration, two entry points (SPEC §3–§4).

- `full_loss`: the full-vocabulary objective, what an online teacher gives. The reference.
- `sparse_loss`: the (k + 1)-bin objective from a cached top-k teacher with its exact tail
  mass. The student side is `amid.bins.student_bins` (a custom autograd function over the
  [N, V] logits, chunked, gradient written in place); the [N, k + 1] objective on top of it is
  `bins_loss`, run through torch.compile on CUDA by `amid.fused`, whose `fused_sparse_loss` goes
  one step further and never builds the logits at all.

Both return the per-position loss, shape [N]; masking and averaging are the caller's.
Arithmetic runs in the wider of float32 and the logits' dtype.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from amid import divergences as D
from amid.bins import check_distinct, compute_dtype, student_bins
from amid.mixture import log_alpha_mixture

__all__ = [
    "LossConfig",
    "PRESETS",
    "full_loss",
    "sparse_loss",
    "bins_loss",
    "tail_weight_degree",
    "check_teacher_bins",
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


def _normalise(log_x: Tensor) -> Tensor:
    return log_x - torch.logsumexp(log_x, dim=-1, keepdim=True)


def _divergence(log_a: Tensor, log_b: Tensor, cfg: LossConfig, weight: Tensor | None, exact: bool) -> Tensor:
    if cfg.divergence == "kl":
        return D.kl(log_a, log_b, weight)
    if cfg.divergence == "ab":
        return D.alpha_beta(log_a, log_b, cfg.ab_alpha, cfg.ab_beta, weight, exact=exact)
    if cfg.divergence == "tv":
        return D.total_variation(log_a, log_b, weight)
    return D.jensen_shannon(log_a, log_b, cfg.jsd_beta, weight)


def _objective(log_p: Tensor, log_q: Tensor, cfg: LossConfig, weight: Tensor | None = None,
               exact: bool = False) -> Tensor:
    """D on the chosen order of (p, q, r) over the last dimension; [..., K] → [...]. `exact`: the
    α-β divergence in its cancellation-free form whatever its parameters (`D.alpha_beta`)."""
    log_q_in_r = log_q.detach() if cfg.stop_grad_r else log_q
    log_r = log_alpha_mixture(log_p, log_q_in_r, cfg.alpha, cfg.lam)
    first, second = {
        "pr": (log_p, log_r),
        "rp": (log_r, log_p),
        "qr": (log_q, log_r),
        "rq": (log_r, log_q),
    }[cfg.order]
    return _divergence(first, second, cfg, weight, exact)


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
    dtype = compute_dtype(student_logits)
    log_q = F.log_softmax(student_logits.to(dtype), dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().to(dtype), dim=-1)
    return _objective(log_p, log_q, config)


def sparse_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    config: LossConfig,
    check_ids: bool = True,
) -> Tensor:
    """The (k + 1)-bin AMiD loss per position against a cached top-k teacher (SPEC §4).

    Args:
        student_logits: [N, V] any float dtype. V may exceed the teacher's vocabulary (padded
            student vocabularies): every logit outside `topk_ids` counts toward the tail.
        topk_ids: [N, k] integer, distinct per row.
        topk_logprobs: [N, k] teacher log-probabilities of those ids under its full softmax.
        tail_logmass: [N] teacher log(1 − Σ_{x∈S} p(x)); −inf if the top-k hold all the mass.
        config: the objective.
        check_ids: check the targets (two host syncs): refuse a row that names an id twice, or
            whose k + 1 teacher bins are not a distribution (`check_teacher_bins`). The trainer
            passes False for a cache's targets, written by cache-teacher and covered by the
            shards' checksums.

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
    if check_ids:
        check_distinct(topk_ids)
        check_teacher_bins(topk_logprobs, tail_logmass)
    s = tail_weight_degree(config)
    log_q_s, log_q_tail, log_gamma = student_bins(student_logits, topk_ids, s)
    return bins_loss(log_q_s, log_q_tail, log_gamma, topk_logprobs, tail_logmass, config)


# How far the teacher's k + 1 bins may sum from 1: a cache's 8-mantissa-bit log-probabilities move
# the sum by at most 2^-9 times the top-k's entropy (≤ 0.01 at k = 64); a slip such as logits in
# place of log-probabilities moves it by orders of magnitude more.
BINS_MASS_TOLERANCE = 0.05


def check_teacher_bins(topk_logprobs: Tensor, tail_logmass: Tensor) -> None:
    """ValueError unless each row's teacher bins (topk_logprobs [N, k], tail_logmass [N]) hold a
    total mass within `BINS_MASS_TOLERANCE` of 1 (no NaN). One host sync. The loss renormalises
    the bins (storage rounding); this catches targets that were never log-probabilities."""
    if topk_logprobs.numel() == 0:
        return
    log_mass = torch.logsumexp(torch.cat([topk_logprobs.detach().float(), tail_logmass.detach().float()[:, None]], 1), 1)
    bad = ~(log_mass.abs() <= math.log1p(BINS_MASS_TOLERANCE))  # NaN is bad too
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"row {row}'s teacher bins hold a mass of {math.exp(log_mass[row].item()):.4g}, not 1: topk_logprobs "
            "must be log-probabilities under the teacher's full softmax (log_softmax, then top-k, not logits) and "
            "tail_logmass log(1 - their total)"
        )


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

    out = fused.compiled_objective(_bins_loss_eager, log_q_s, log_q_tail, log_gamma, topk_logprobs, tail_logmass,
                                   config)
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

    # Only k + 1 wide: the α-β divergence can afford its exact form (D.alpha_beta).
    if config.tail == "renorm":
        return _objective(_normalise(log_p_s), _normalise(log_q_s), config, exact=True)

    # Cached values carry storage rounding; renormalise the teacher's k + 1 bins so they sum to 1.
    log_p = _normalise(torch.cat([log_p_s, tail_logmass.detach().to(dtype)[:, None]], dim=-1))
    log_q = torch.cat([log_q_s, log_q_tail[:, None]], dim=-1)
    weight = None
    if tail_weight_degree(config) is not None:
        weight = torch.cat([torch.ones_like(log_q_s), log_gamma.exp()[:, None]], dim=-1)
    return _objective(log_p, log_q, config, weight, exact=True)


def mix_ce(kd: Tensor, ce: Tensor, config: LossConfig) -> Tensor:
    """(1 − w)·KD + w·CE with w = config.ce_weight; skips a term whose weight is 0."""
    w = config.ce_weight
    if w == 0.0:
        return kd
    if w == 1.0:
        return ce
    return (1.0 - w) * kd + w * ce

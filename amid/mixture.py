"""The α-mixture assistant distribution of AMiD (SPEC §2), as a pure tensor function.

For teacher p, student q, teacher weight λ and c = (1 − α)/2:

    α ≠ 1:  r̃ = (λ p^c + (1 − λ) q^c)^(1/c)
    α = 1:  r̃ = p^λ q^(1 − λ)
    r = r̃ / Σ r̃

Everything is computed in log space. The α ≠ 1 branch is written around the larger of c·log p
and c·log q ("ref") as

    log r̃ = ref + (1/c) · log1p( w_other · expm1(c · (other − ref)) )

so that the argument of expm1 is always ≤ 0 (no overflow for large |c|), and the α → 1 limit
(c → 0) loses no precision: log1p(w·expm1(c·d))/c → w·d, which is the geometric formula. The plain
`logaddexp(...)/c` form loses ~eps/|c| absolute at α = 0.999 in float32. Where the sum inside the
log1p is far below 1 (tiny λ or 1 − λ with large |c|) the logaddexp form is the accurate one and
is used instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["log_alpha_mixture"]

# |c| = |1 − α|/2 beyond which the α ≠ 1 formula is replaced by its ±inf limit (c·log p would
# overflow float32 near |c| = 1e34 for log-probabilities of −1e4).
_C_LIMIT = 1e30


def log_alpha_mixture(log_p: Tensor, log_q: Tensor, alpha: float, lam: float) -> Tensor:
    """Normalised log of the α-mixture of p and q over the last dimension.

    Args:
        log_p: teacher log-probabilities, [..., K], float32 or float64; −inf marks a zero.
        log_q: student log-probabilities, same shape and dtype.
        alpha: any real number; ±inf give the normalised max(p, q) / min(p, q) limits (so does
            |1 − α|/2 > 1e30, where they are exact to float64).
        lam: teacher weight λ ∈ [0, 1]; λ = 1 returns p, λ = 0 returns q (renormalised).

    Returns:
        log r, [..., K], same dtype. Entries where r is exactly zero are −inf; gradients are
        finite (never NaN) wherever r is not identically zero.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if math.isnan(alpha):
        raise ValueError("alpha must be a number, got nan")
    if lam == 1.0:
        return _normalise(log_p)
    if lam == 0.0:
        return _normalise(log_q)
    if alpha == 1.0:
        return _normalise(lam * log_p + (1.0 - lam) * log_q)
    c = (1.0 - alpha) / 2.0
    if abs(c) > _C_LIMIT:
        # ±inf, or so large that c·log p would overflow: the normalised max(p, q) / min(p, q)
        # (r̃ differs from them by a factor λ^(1/c) ≈ 1 − 1e-30·log λ).
        pick = torch.maximum if c > 0 else torch.minimum
        return _normalise(pick(log_p, log_q))

    neg_p, neg_q = torch.isneginf(log_p), torch.isneginf(log_q)
    # Where r̃ is exactly zero: both zero for c > 0; either zero for c < 0 (p^c = +inf there).
    dead = (neg_p & neg_q) if c > 0 else (neg_p | neg_q)
    # Substitute harmless values in dead entries so no branch of the backward sees inf − inf.
    lp = torch.where(dead, torch.zeros_like(log_p), log_p)
    lq = torch.where(dead, torch.zeros_like(log_q), log_q)
    p_is_ref = (c * lp) >= (c * lq)
    ref = torch.where(p_is_ref, lp, lq)
    other = torch.where(p_is_ref, lq, lp)
    # The weights and their logs come from float64 scalars: 1 − w_ref in float32 would drop a
    # λ below 6e-8 (1 − λ rounds to 1), which the division by a small c then magnifies.
    def by_ref(if_p: float, if_q: float) -> Tensor:
        return torch.where(p_is_ref, lp.new_tensor(if_p), lp.new_tensor(if_q))

    w_other = by_ref(1.0 - lam, lam)
    log_w_ref, log_w_other = by_ref(math.log(lam), math.log1p(-lam)), by_ref(math.log1p(-lam), math.log(lam))
    # c·(other − ref) ≤ 0 by the choice of ref; −inf when `other` is a zero that c > 0 allows.
    cd = c * (other - ref)
    # log(w_ref + w_other·e^cd): as log1p(w_other·expm1(cd)) while the sum is near 1 (exact as
    # c → 0), as a logaddexp when it is small (w_ref tiny and e^cd ≪ 1), where log1p would round.
    y = w_other * torch.expm1(cd)
    near_one = y > -0.5
    log_sum = torch.where(
        near_one,
        torch.log1p(torch.where(near_one, y, torch.full_like(y, -0.5))),
        torch.logaddexp(log_w_ref, log_w_other + cd),
    )
    log_r_tilde = ref + log_sum / c
    log_r_tilde = torch.where(dead, torch.full_like(log_r_tilde, -math.inf), log_r_tilde)
    return _normalise(log_r_tilde)


def _normalise(log_x: Tensor) -> Tensor:
    return log_x - torch.logsumexp(log_x, dim=-1, keepdim=True)

"""Divergences between distributions given as log-probabilities on the last dimension.

Pure tensor functions: each takes `log_a`, `log_b` of shape [..., K] (−inf marks a zero
probability) and returns the per-position divergence D(a ‖ b) of shape [...].

`weight` ([..., K], optional) multiplies each bin's term before the sum. The sparse loss uses it
for the tail bin of the α-β divergence, which is homogeneous of degree a + b rather than 1
(SPEC §4).

Zero-probability conventions: a bin where both arguments are zero contributes exactly 0 (with
zero gradient). Genuine infinities (KL(a‖b) with b = 0 < a) return +inf, never NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from amid.mixture import log_alpha_mixture

__all__ = ["kl", "alpha_beta", "total_variation", "jensen_shannon", "DIVERGENCES"]


def _weighted_sum(terms: Tensor, weight: Tensor | None) -> Tensor:
    if weight is not None:
        terms = terms * weight
    return terms.sum(dim=-1)


def kl(log_a: Tensor, log_b: Tensor, weight: Tensor | None = None) -> Tensor:
    """KL(a ‖ b) = Σ a (log a − log b); terms with a = 0 are 0, terms with b = 0 < a are +inf."""
    a_zero = torch.isneginf(log_a)
    # a > 0 = b is +inf even when exp(log a) underflows to 0 (0·inf would be NaN).
    b_only_zero = torch.isneginf(log_b) & ~a_zero
    safe = a_zero | b_only_zero
    la = torch.where(safe, torch.zeros_like(log_a), log_a)
    lb = torch.where(safe, torch.zeros_like(log_b), log_b)
    terms = la.exp() * (la - lb)
    terms = torch.where(a_zero, torch.zeros_like(terms), terms)
    terms = torch.where(b_only_zero, torch.full_like(terms, math.inf), terms)
    return _weighted_sum(terms, weight)


def alpha_beta(
    log_a: Tensor, log_b: Tensor, a: float = 0.2, b: float = 0.7, weight: Tensor | None = None,
    exact: bool = False,
) -> Tensor:
    """The α-β divergence of Cichocki, Cruces & Amari (2011), as used by ABKD, with parameters (a, b):

        D = −1/(ab) Σ [x^a y^b − a/(a+b) x^(a+b) − b/(a+b) y^(a+b)],      x = a-dist, y = b-dist

    and its continuous limits at a = 0, b = 0, a + b = 0 (and a = b = 0).

    Near a limit (0.1 + 0.2 − 0.3 is 5.6e-17, not 0) the three terms cancel: their rounding,
    ~eps/(ab) of them, swamps the sum. There each term is computed as (log x − log y)² ·
    exp[(a+b)·log x, a·log x + b·log y, (a+b)·log y], the second divided difference of exp at
    three points (the bracket is the Jensen gap of exp with weights a/(a+b) and b/(a+b)): one
    smooth expression for every (a, b), the limits included, accurate to a few ulp whatever a, b
    and x/y are. It costs ~10x the textbook formula's elementwise work, so unless `exact` (the
    sparse loss's k + 1 bins, where the cost is nothing) parameters at least AB_TEXTBOOK_FROM from
    every limit (ABKD's (0.2, 0.7)) keep the textbook formula over a full vocabulary: its error
    there is at most ~eps/(ab) of the terms' size, which is all of a term where x ≈ y (the value
    near convergence; the gradient keeps ~eps/(b·|log x − log y|) relative accuracy). Bins where
    exactly one of x, y is 0 take the formula's limit there (finite or +inf, never NaN).
    """
    a_zero, b_zero = torch.isneginf(log_a), torch.isneginf(log_b)
    both_zero = a_zero & b_zero
    if not exact and min(abs(a), abs(b), abs(a + b)) >= AB_TEXTBOOK_FROM:
        lx = torch.where(both_zero, torch.zeros_like(log_a), log_a)
        ly = torch.where(both_zero, torch.zeros_like(log_b), log_b)
        terms = torch.where(both_zero, torch.zeros_like(lx), _alpha_beta_textbook(lx, ly, a, b))
        return _weighted_sum(terms, weight)
    x_zero, y_zero = a_zero & ~b_zero, b_zero & ~a_zero
    regular = ~(a_zero | b_zero)
    # Each branch sees only the bins it serves (zeros elsewhere), so neither's gradient can be NaN.
    lx = torch.where(regular, log_a, torch.zeros_like(log_a))
    ly = torch.where(regular, log_b, torch.zeros_like(log_b))
    s = a + b
    terms = (lx - ly) ** 2 * _exp_second_difference(s * lx, a * lx + b * ly, s * ly)
    # Exactly one of x, y is 0: the formula's limit there, for every (a, b): x → 0 leaves
    # y^(a+b)/(a(a+b)) where a and a + b are positive and +inf otherwise; y → 0 likewise.
    y_of = torch.where(x_zero, log_b, torch.zeros_like(log_b))
    x_of = torch.where(y_zero, log_a, torch.zeros_like(log_a))
    at_x0 = torch.exp(s * y_of) / (a * s) if a > 0 and s > 0 else math.inf
    at_y0 = torch.exp(s * x_of) / (b * s) if b > 0 and s > 0 else math.inf
    terms = torch.where(x_zero, at_x0, torch.where(y_zero, at_y0, terms))
    return _weighted_sum(terms, weight)


# The least distance of (a, b) from the α-β divergence's limits (|a|, |b|, |a + b|) at which the
# textbook formula is used: its relative error there is at most ~eps/(0.1·0.1), 6e-6 in float32.
AB_TEXTBOOK_FROM = 0.1


def _alpha_beta_textbook(lx: Tensor, ly: Tensor, a: float, b: float) -> Tensor:
    """The α-β term by its textbook formula, a, b and a + b nonzero (it cancels near a limit)."""
    s = a + b
    return -(torch.exp(a * lx + b * ly) - (a / s) * torch.exp(s * lx) - (b / s) * torch.exp(s * ly)) / (a * b)


def _exp_second_difference(z0: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """exp[z0, z1, z2], exp's second divided difference (e^z / 2 where the points coincide).

    With the points sorted lo ≤ mid ≤ hi, d_lo = lo − mid ≤ 0 ≤ d_hi = hi − mid:
    exp[lo, mid, hi] = (d_hi·G(d_hi) − d_lo·G(d_lo)) / (d_hi − d_lo), G(d) = e^mid·(e^d − 1 − d)/d²,
    a weighted mean of two positive numbers: nothing cancels. G is a series where |d| is small."""
    lo = torch.minimum(torch.minimum(z0, z1), z2)
    hi = torch.maximum(torch.maximum(z0, z1), z2)
    mid = torch.maximum(torch.minimum(z0, z1), torch.minimum(torch.maximum(z0, z1), z2))
    d_lo, d_hi = lo - mid, hi - mid
    span = d_hi - d_lo
    apart = span > 0
    w_hi = torch.where(apart, d_hi / torch.where(apart, span, torch.ones_like(span)), torch.full_like(span, 0.5))
    return w_hi * _exp_taylor_rest(mid, hi, d_hi) + (1.0 - w_hi) * _exp_taylor_rest(mid, lo, d_lo)


# (e^d − 1 − d)/d² = Σ_n d^n/(n + 2)!; through n = 12 the series is exact to float64 for |d| < 1/2.
_REST_COEFFS = [1.0 / math.factorial(n + 2) for n in range(13)]
_REST_SERIES_BELOW = 0.5


def _exp_taylor_rest(mid: Tensor, end: Tensor, d: Tensor) -> Tensor:
    """e^mid·(e^d − 1 − d)/d² with end = mid + d: e^end − e^mid·(1 + d) over d², by the series
    where |d| is small (there e^d − 1 − d cancels), directly elsewhere (no e^d alone, which
    could overflow where e^end does not)."""
    small = d.abs() < _REST_SERIES_BELOW
    ds = torch.where(small, d, torch.zeros_like(d))
    series = torch.full_like(d, _REST_COEFFS[-1])
    for c in reversed(_REST_COEFFS[:-1]):
        series = series * ds + c
    dl = torch.where(small, torch.ones_like(d), d)
    direct = (torch.where(small, torch.zeros_like(end), end).exp() - mid.exp() * (1.0 + dl)) / (dl * dl)
    return torch.where(small, mid.exp() * series, direct)


def total_variation(log_a: Tensor, log_b: Tensor, weight: Tensor | None = None) -> Tensor:
    """TV(a, b) = ½ Σ |a − b|."""
    return 0.5 * _weighted_sum((log_a.exp() - log_b.exp()).abs(), weight)


def jensen_shannon(
    log_a: Tensor, log_b: Tensor, beta: float = 0.5, weight: Tensor | None = None
) -> Tensor:
    """Generalised JSD_β(a, b) = β KL(a ‖ m) + (1 − β) KL(b ‖ m), m = β a + (1 − β) b."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    log_m = log_alpha_mixture(log_a, log_b, alpha=-1.0, lam=beta)
    return beta * kl(log_a, log_m, weight) + (1.0 - beta) * kl(log_b, log_m, weight)


DIVERGENCES = ("kl", "ab", "tv", "jsd")


def degree(name: str, ab_alpha: float, ab_beta: float) -> float:
    """Degree of homogeneity of the divergence's per-bin term (1 for KL, TV, JSD and every
    f-divergence; a + b for α-β). Used to weight the tail bin of the sparse loss."""
    if name == "ab":
        return ab_alpha + ab_beta
    if name in DIVERGENCES:
        return 1.0
    raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")


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
    log_a: Tensor, log_b: Tensor, a: float = 0.2, b: float = 0.7, weight: Tensor | None = None
) -> Tensor:
    """The α-β divergence of Cichocki, Cruces & Amari (2011), as used by ABKD, with parameters (a, b):

        D = −1/(ab) Σ [x^a y^b − a/(a+b) x^(a+b) − b/(a+b) y^(a+b)],      x = a-dist, y = b-dist

    and its continuous limits at a = 0, b = 0, a + b = 0 (and a = b = 0).
    """
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)
    lx = torch.where(both_zero, torch.zeros_like(log_a), log_a)
    ly = torch.where(both_zero, torch.zeros_like(log_b), log_b)
    s = a + b
    if a != 0 and b != 0 and s != 0:
        terms = -(
            torch.exp(a * lx + b * ly)
            - (a / s) * torch.exp(s * lx)
            - (b / s) * torch.exp(s * ly)
        ) / (a * b)
    elif a != 0 and b == 0:
        xa = torch.exp(a * lx)
        terms = (xa * a * (lx - ly) - xa + torch.exp(a * ly)) / (a * a)
    elif a == 0 and b != 0:
        yb = torch.exp(b * ly)
        terms = (yb * b * (ly - lx) - yb + torch.exp(b * lx)) / (b * b)
    elif a != 0:  # a + b == 0
        terms = (a * (ly - lx) + torch.exp(a * (lx - ly)) - 1.0) / (a * a)
    else:  # a == b == 0
        terms = 0.5 * (lx - ly) ** 2
    terms = torch.where(both_zero, torch.zeros_like(terms), terms)
    return _weighted_sum(terms, weight)


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


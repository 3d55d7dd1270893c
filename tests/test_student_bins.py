"""The custom autograd function behind sparse_loss: values and gradients against plain autograd."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amid import bins
from amid.losses import student_bins


def _naive_bins(z: torch.Tensor, ids: torch.Tensor, s: float | None):
    """Plain float64 autograd: log_softmax, mask the top-k, logsumexp. Rows without a tail get
    log q_tail = −inf and log γ = 0 through a where() that keeps their gradient free of nan."""
    log_q = torch.log_softmax(z.double(), dim=-1)
    in_s = torch.zeros_like(log_q, dtype=torch.bool).scatter_(1, ids, True)
    tail = log_q.masked_fill(in_s, -math.inf)
    has_tail = torch.isfinite(tail).any(dim=-1)
    safe = torch.where(has_tail[:, None], tail, torch.zeros_like(tail))
    lse = torch.logsumexp(safe, dim=-1)
    log_tail = torch.where(has_tail, lse, torch.full_like(lse, -math.inf))
    out = [log_q.gather(1, ids), log_tail]
    if s is not None:
        scaled = torch.where(torch.isneginf(safe), safe, s * safe)
        out.append(torch.where(has_tail, torch.logsumexp(scaled, dim=-1) - s * lse, torch.zeros_like(lse)))
    return out


def _ids(n, v, k, gen):
    return torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)])


@pytest.mark.parametrize("s", [None, 0.9, 1.7, 0.0, -0.5])
def test_gradcheck_every_output(s):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(4, 13, dtype=torch.float64, generator=gen, requires_grad=True)
    ids = _ids(4, 13, 5, gen)
    assert torch.autograd.gradcheck(lambda x: student_bins(x, ids, s), (z,))


@pytest.mark.parametrize("s", [None, 0.9, 0.0, -0.5])
def test_matches_naive_autograd_across_chunks(monkeypatch, s):
    # A tiny chunk size forces many row chunks, so chunk boundaries are exercised.
    monkeypatch.setattr(bins, "CPU_CHUNK_ELEMENTS", 40)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(9, 17, dtype=torch.float64, generator=gen) * 3
    z[:, -2:] = -math.inf  # padded vocabulary entries
    ids = _ids(9, 15, 6, gen)
    z1 = z.clone().requires_grad_()
    z2 = z.clone().requires_grad_()
    got = student_bins(z1, ids, s)
    want = _naive_bins(z2, ids, s)
    weights = [torch.randn_like(w) for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    sum((g * c).sum() for g, c in zip(got, weights)).backward()
    sum((w * c).sum() for w, c in zip(want, weights)).backward()
    torch.testing.assert_close(z1.grad, z2.grad.nan_to_num(0.0), rtol=1e-10, atol=1e-12)
    assert z1.grad[:, -2:].abs().max() == 0


def test_tail_exact_when_topk_hold_almost_all_mass():
    # q_tail ~ 1e-30: 1 − Σ q(S) would round to 0 in float32; the complement logsumexp does not.
    z = torch.zeros(1, 6)
    z[0, :3] = 80.0
    ids = torch.tensor([[0, 1, 2]])
    _, log_tail, _ = student_bins(z, ids)
    want = math.log(3) - 80.0 - math.log(3)  # log(3 e^0) − log(3 e^80 + 3)
    assert abs(log_tail.item() - want) < 1e-4


def test_no_tail_gives_minus_inf_and_zero_gradient():
    z = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    ids = torch.arange(4).expand(2, 4)
    log_s, log_tail, log_gamma = student_bins(z, ids, 0.9)
    assert torch.isneginf(log_tail).all() and (log_gamma == 0).all()
    (log_s.exp().sum() + log_gamma.sum()).backward()
    assert torch.isfinite(z.grad).all()


def test_bf16_logits_computed_in_float32_with_bf16_grad():
    gen = torch.Generator().manual_seed(3)
    z = (torch.randn(5, 50, generator=gen) * 4).bfloat16().requires_grad_()
    ids = _ids(5, 50, 8, gen)
    log_s, log_tail, _ = student_bins(z, ids)
    assert log_s.dtype == torch.float32 and log_tail.dtype == torch.float32
    want_s, want_tail = _naive_bins(z.detach().float(), ids, None)
    torch.testing.assert_close(log_s.double(), want_s, rtol=0, atol=1e-5)
    (log_s.sum() + log_tail.sum()).backward()
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad.float()).all()


@pytest.mark.parametrize("s", [None, 0.9, -0.5])
def test_empty_batch(s):
    z = torch.randn(0, 10, requires_grad=True)
    log_s, log_tail, log_gamma = student_bins(z, torch.zeros(0, 3, dtype=torch.long), s)
    assert log_s.shape == (0, 3) and log_tail.shape == log_gamma.shape == (0,)
    (log_s.sum() + log_tail.sum() + log_gamma.sum()).backward()
    assert z.grad.shape == (0, 10)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 7),
    v=st.integers(2, 30),
    k_share=st.floats(0.05, 1.0),
    s=st.sampled_from([None, 0.9, 2.5, 0.0, -0.7]),
    scale=st.sampled_from([0.1, 3.0, 60.0]),
    masked=st.integers(0, 3),
    budget=st.sampled_from([1, 7, 40, 1 << 20]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_float64_autograd(n, v, k_share, s, scale, masked, budget, seed):
    # Any shape, chunking (`budget` logits a chunk), −inf columns, scale (top-k holding almost all
    # the mass at 60), rows with no tail (k = every finite column) and any tail exponent s.
    gen = torch.Generator().manual_seed(seed)
    masked = min(masked, v - 1)
    finite = v - masked
    k = max(1, min(finite, round(k_share * finite)))
    z = torch.randn(n, v, dtype=torch.float64, generator=gen) * scale
    if masked:
        z[:, -masked:] = -math.inf
    ids = _ids(n, finite, k, gen) if n else torch.zeros(0, k, dtype=torch.long)
    old = bins.CPU_CHUNK_ELEMENTS
    bins.CPU_CHUNK_ELEMENTS = budget
    try:
        z1 = z.clone().requires_grad_()
        got = student_bins(z1, ids, s)
    finally:
        bins.CPU_CHUNK_ELEMENTS = old
    z2 = z.clone().requires_grad_()
    want = _naive_bins(z2, ids, s)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
    weights = [torch.randn(w.shape, dtype=torch.float64, generator=gen) for w in want]
    # log q_tail = −inf (no tail) carries no gradient: weigh its finite entries only.
    loss = lambda outs: sum(  # noqa: E731
        torch.where(torch.isfinite(o), o, torch.zeros_like(o)).mul(c).sum() for o, c in zip(outs, weights))
    loss(got).backward()
    loss(want).backward()
    assert torch.isfinite(z2.grad).all()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-8, atol=1e-10)
    if masked:
        assert (z1.grad[:, -masked:] == 0).all()

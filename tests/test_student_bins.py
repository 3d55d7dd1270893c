"""The custom autograd function behind sparse_loss: values and gradients against plain autograd."""

import math

import pytest
import torch

from amid import bins
from amid.losses import student_bins


def _naive_bins(z: torch.Tensor, ids: torch.Tensor, s: float | None):
    log_q = torch.log_softmax(z.double(), dim=-1)
    in_s = torch.zeros_like(log_q, dtype=torch.bool).scatter_(1, ids, True)
    tail = log_q.masked_fill(in_s, -math.inf)
    log_tail = torch.logsumexp(tail, dim=-1)
    out = [log_q.gather(1, ids), log_tail]
    if s is not None:
        scaled = torch.where(torch.isneginf(tail), tail, s * tail)
        out.append(torch.logsumexp(scaled, dim=-1) - s * log_tail)
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

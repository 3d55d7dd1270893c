"""fused_sparse_loss against sparse_loss on materialised logits: values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from amid import bins, fused
from amid.fused import fused_sparse_loss
from amid.losses import PRESETS, LossConfig, sparse_loss
from helpers import compiled_kernels_testable

MODES = ("recompute", "forward")


def _problem(n=13, h=8, v=67, k=5, teacher_v=None, dtype=torch.float64, bias=True, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    teacher_v = teacher_v or v
    hidden = torch.randn(n, h, dtype=torch.float64, generator=gen)
    weight = torch.randn(v, h, dtype=torch.float64, generator=gen) * 0.7
    b = torch.randn(v, dtype=torch.float64, generator=gen) if bias else None
    ids = torch.stack([torch.randperm(teacher_v, generator=gen)[:k] for _ in range(n)])
    log_p = torch.log_softmax(torch.randn(n, teacher_v, dtype=torch.float64, generator=gen) * 2, dim=-1)
    top = log_p.gather(1, ids)
    in_s = torch.zeros_like(log_p, dtype=torch.bool).scatter_(1, ids, True)
    tail = torch.logsumexp(log_p.masked_fill(in_s, -math.inf), dim=-1)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), ids.to(device), top.float().to(device), tail.float().to(device)


def _both(hidden, weight, bias, ids, top, tail, cfg, weights=None, **kw):
    """(loss, grads) of the materialised and the fused path, with Σ weights·loss backpropagated."""
    out = []
    for path in ("materialised", "fused"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        b = None if bias is None else bias.clone().requires_grad_()
        if path == "materialised":
            loss = sparse_loss(F.linear(h, w, b), ids, top, tail, cfg)
        else:
            loss = fused_sparse_loss(h, w, b, ids, top, tail, cfg, **kw)
        (loss.mean() if weights is None else (loss * weights).sum()).backward()
        out.append((loss.detach(), h.grad, w.grad, None if b is None else b.grad))
    return out


def _assert_match(ref, got, rtol, atol):
    for name, r, g in zip(("loss", "grad hidden", "grad weight", "grad bias"), ref, got):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == r.dtype, name
        torch.testing.assert_close(g.double(), r.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_float64(preset, mode):
    # chunk_size 4 with N = 13: forward row chunks 4, 4, 4, 1; backward vocabulary blocks 20, 20, 20, 7.
    prob = _problem(seed=1)
    weights = torch.rand(13, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    ref, got = _both(*prob, LossConfig.preset(preset), weights=weights, chunk_size=4, mode=mode)
    _assert_match(ref, got, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_float32(preset, mode):
    prob = _problem(seed=2, dtype=torch.float32)
    ref, got = _both(*prob, LossConfig.preset(preset), chunk_size=5, mode=mode)
    _assert_match(ref, got, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ["pr", "rp", "qr", "rq"])
@pytest.mark.parametrize(
    "extra",
    [
        dict(alpha=0.5, lam=0.3, divergence="kl"),
        dict(alpha=3.0, lam=0.6, divergence="ab", ab_alpha=0.2, ab_beta=0.7),
        dict(alpha=-1.0, lam=0.5, divergence="jsd"),
        dict(alpha=1.0, lam=0.4, divergence="tv"),
    ],
    ids=["kl", "ab", "jsd", "tv"],
)
def test_every_order(order, extra, mode):
    prob = _problem(seed=3)
    weights = torch.randn(13, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref, got = _both(*prob, LossConfig(order=order, **extra), weights=weights, chunk_size=3, mode=mode)
    _assert_match(ref, got, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tail", ["renorm", "bucket_unweighted"])
def test_other_tail_modes(tail, mode):
    prob = _problem(seed=5)
    cfg = LossConfig.preset("abkd", tail=tail)
    ref, got = _both(*prob, cfg, chunk_size=6, mode=mode)
    _assert_match(ref, got, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_no_bias_and_default_chunks(mode):
    prob = _problem(bias=False, seed=6)
    ref, got = _both(*prob, LossConfig.preset("amid"), mode=mode)
    _assert_match(ref, got, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", ["amid", "abkd"])
def test_padded_vocabulary(preset, mode):
    # The student's vocabulary is 67 rows, the teacher's 60: the 7 extra rows count in the tail;
    # the last 3 are masked with a −inf bias (they must get exactly zero gradient).
    hidden, weight, bias, ids, top, tail = _problem(teacher_v=60, seed=7)
    bias[-3:] = -math.inf
    ref, got = _both(hidden, weight, bias, ids, top, tail, LossConfig.preset(preset), chunk_size=4, mode=mode)
    _assert_match(ref, got, rtol=1e-10, atol=1e-12)
    assert (got[2][-3:] == 0).all() and (got[3][-3:] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_topk_holding_almost_all_mass(mode):
    # q_tail ~ e^-80: computed as a log-sum-exp over the complement, exact in float32 too.
    hidden, weight, bias, ids, top, tail = _problem(n=4, v=20, k=3, dtype=torch.float32, seed=8)
    bias = torch.zeros_like(bias)
    bias[ids[:, 0]] = 0.0
    hidden = torch.zeros_like(hidden)
    bias.scatter_(0, ids[0], 80.0)  # row 0's top-k hold all but ~e^-80 of the mass
    ref, got = _both(hidden, weight, bias, ids, top, tail, LossConfig.preset("kd"), mode=mode)
    _assert_match(ref, got, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(got[0]).all()


@pytest.mark.parametrize("mode", MODES)
def test_frozen_head_and_no_grad(mode):
    hidden, weight, bias, ids, top, tail = _problem(seed=10)
    cfg = LossConfig.preset("skl")
    want = sparse_loss(F.linear(hidden, weight, bias), ids, top, tail, cfg)
    with torch.no_grad():
        got = fused_sparse_loss(hidden, weight, bias, ids, top, tail, cfg, chunk_size=5, mode=mode)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    h = hidden.clone().requires_grad_()
    fused_sparse_loss(h, weight, bias, ids, top, tail, cfg, chunk_size=5, mode=mode).sum().backward()
    h_ref = hidden.clone().requires_grad_()
    sparse_loss(F.linear(h_ref, weight, bias), ids, top, tail, cfg).sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", ["amid", "abkd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_eager_sub_chunks_match_float64(preset, mode, dtype, monkeypatch):
    # The eager elementwise work runs in sub-chunks of amid.bins.CPU_CHUNK_ELEMENTS logits inside
    # each matmul chunk (and each backward block): 150 logits = 2 rows of V = 67, 2 rows of a block.
    prob = _problem(seed=12)
    cfg = LossConfig.preset(preset)
    ref = _both(*prob, cfg, chunk_size=5, mode=mode)[0]
    monkeypatch.setattr(bins, "CPU_CHUNK_ELEMENTS", 150)
    hidden, weight, bias, ids, top, tail = prob
    mat, got = _both(hidden.to(dtype), weight.to(dtype), bias.to(dtype), ids, top, tail, cfg, chunk_size=5, mode=mode)
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-3)
    for name, r, m, g in zip(("loss", "grad hidden", "grad weight", "grad bias"), ref, mat, got):
        assert g.dtype == (torch.float32 if name == "loss" else dtype), name
        torch.testing.assert_close(g.double(), r, **tol, msg=lambda msg: f"{name}: {msg}")
        torch.testing.assert_close(m.double(), r, **tol, msg=lambda msg: f"{name} (materialised): {msg}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", ["amid", "abkd"])
def test_empty_batch(preset, mode):
    hidden, weight, bias, ids, top, tail = _problem(seed=13)
    hidden, ids, top, tail = hidden[:0], ids[:0], top[:0], tail[:0]
    cfg = LossConfig.preset(preset)
    z = F.linear(hidden, weight, bias).requires_grad_()
    assert sparse_loss(z, ids, top, tail, cfg).shape == (0,)
    w = weight.clone().requires_grad_()
    loss = fused_sparse_loss(hidden, w, bias, ids, top, tail, cfg, mode=mode)
    assert loss.shape == (0,)
    loss.sum().backward()
    assert (w.grad == 0).all()


def test_rejects_bad_shapes():
    hidden, weight, bias, ids, top, tail = _problem()
    cfg = LossConfig()
    with pytest.raises(ValueError):
        fused_sparse_loss(hidden[:-1], weight, bias, ids, top, tail, cfg)
    with pytest.raises(ValueError):
        fused_sparse_loss(hidden, weight[:, :-1], bias, ids, top, tail, cfg)
    with pytest.raises(ValueError):
        fused_sparse_loss(hidden, weight, bias[:-1], ids, top, tail, cfg)
    with pytest.raises(ValueError):
        fused_sparse_loss(hidden, weight, bias, ids, top, tail, cfg, mode="nope")


@pytest.mark.skipif(not compiled_kernels_testable(), reason="compiled kernels: CUDA only (AMID_TEST_COMPILE=1 forces on CPU)")
@pytest.mark.parametrize("preset", ["amid", "abkd"])
def test_compiled_kernels_match(preset, monkeypatch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prob = _problem(n=37, h=16, v=301, k=8, teacher_v=290, dtype=torch.float32, seed=11, device=device)
    weights = torch.rand(37, generator=torch.Generator().manual_seed(3)).to(device)
    cfg = LossConfig.preset(preset)
    monkeypatch.setenv("AMID_COMPILE", "0")
    ref = _both(*prob, cfg, weights=weights, chunk_size=7)[0]  # eager materialised reference
    monkeypatch.setenv("AMID_COMPILE", "1")
    for mode in MODES:
        mat, got = _both(*prob, cfg, weights=weights, chunk_size=7, mode=mode)
        assert not fused._compile_state["failed"]
        _assert_match(ref, mat, rtol=1e-4, atol=1e-5)  # student_bins' compiled path
        _assert_match(ref, got, rtol=1e-4, atol=1e-5)


def test_forward_mode_refuses_a_second_backward_in_words():
    hidden, weight, bias, ids, top, tail = _problem()
    hidden.requires_grad_()
    loss = fused_sparse_loss(hidden, weight, bias, ids, top, tail, LossConfig.preset("kd"), mode="forward").sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward.*mode='recompute'"):
        loss.backward()
    again = fused_sparse_loss(hidden, weight, bias, ids, top, tail, LossConfig.preset("kd"), mode="recompute").sum()
    again.backward(retain_graph=True)
    again.backward()

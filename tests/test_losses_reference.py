"""Independent float64 reference tests for the numerical core (SPEC §2–§4).

Everything named ``ref_*`` below is written from SPEC.md alone (not from amid's code) and is
compared against the public API: ``log_alpha_mixture``, ``LossConfig``, ``full_loss`` and
``sparse_loss``. Reference gradients come from autograd through the reference, with explicit
masking so that zero probabilities (log = −inf) give exact limits instead of NaN.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amid.losses import LossConfig, full_loss, sparse_loss
from amid.mixture import log_alpha_mixture

INF = math.inf
NINF = -math.inf
F64 = torch.float64
ORDERS = ("pr", "rp", "qr", "rq")
PRESETS = ("kd", "rkl", "skl", "srkl", "gkd", "taid", "abkd", "amid")
GRID_ALPHAS = (-50.0, -3.0, -1.0, 0.0, 0.5, 0.999, 1.0, 1.001, 3.0, 50.0)
GRID_LAMS = (0.0, 0.1, 0.5, 0.9, 1.0)

HYP = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------------------------------------
# Reference implementation (float64, SPEC §2–§4)
# ---------------------------------------------------------------------------------------------


def ref_normalise(l: torch.Tensor) -> torch.Tensor:
    return l - torch.logsumexp(l, -1, keepdim=True)


def ref_log_mixture(lp: torch.Tensor, lq: torch.Tensor, alpha: float, lam: float) -> torch.Tensor:
    """Normalised log of the α-mixture, SPEC §2, with exact zero handling."""
    if lam == 1.0:
        return ref_normalise(lp)
    if lam == 0.0:
        return ref_normalise(lq)
    fp, fq = lp > NINF, lq > NINF
    lp0 = torch.where(fp, lp, torch.zeros_like(lp))
    lq0 = torch.where(fq, lq, torch.zeros_like(lq))
    ninf = torch.full_like(lp, NINF)
    if alpha == NINF:  # max(p, q)
        lt = torch.maximum(lp, lq)
    elif alpha == INF:  # min(p, q)
        lt = torch.where(fp & fq, torch.minimum(lp0, lq0), ninf)
    elif alpha == 1.0:  # geometric
        lt = torch.where(fp & fq, lam * lp0 + (1 - lam) * lq0, ninf)
    else:
        c = (1.0 - alpha) / 2.0
        a = math.log(lam) + c * lp0
        b = math.log(1 - lam) + c * lq0
        if c > 0:  # zero only where both are zero
            valid = fp | fq
            a = torch.where(fp, a, ninf)
            b = torch.where(fq, b, ninf)
            a = torch.where(valid, a, torch.zeros_like(a))
            b = torch.where(valid, b, torch.zeros_like(b))
        else:  # c < 0: zero wherever either is zero
            valid = fp & fq
        lt = torch.where(valid, torch.logaddexp(a, b) / c, ninf)
    return ref_normalise(lt)


def ref_kl(la, lb, w=None):
    fa, fb = la > NINF, lb > NINF
    both = fa & fb
    la0 = torch.where(both, la, torch.zeros_like(la))
    lb0 = torch.where(both, lb, torch.zeros_like(lb))
    term = torch.where(both, torch.exp(la0) * (la0 - lb0), torch.zeros_like(la))
    term = torch.where(fa & ~fb, torch.full_like(la, INF), term)
    if w is not None:
        term = term * w
    return term.sum(-1)


def ref_ab(la, lb, a, b, w=None):
    """Cichocki–Cruces–Amari α-β divergence with its limits (a, b >= 0 assumed where zeros occur)."""
    w = 1.0 if w is None else w
    if a != 0 and b != 0 and a + b != 0:
        s = a + b
        term = torch.exp(a * la + b * lb) - a / s * torch.exp(s * la) - b / s * torch.exp(s * lb)
        return -(w * term).sum(-1) / (a * b)
    if a != 0 and b == 0:
        term = torch.exp(a * la) * (a * la - a * lb) - torch.exp(a * la) + torch.exp(a * lb)
        return (w * term).sum(-1) / a**2
    if a == 0 and b != 0:
        term = torch.exp(b * lb) * (b * lb - b * la) - torch.exp(b * lb) + torch.exp(b * la)
        return (w * term).sum(-1) / b**2
    if a != 0 and a + b == 0:
        d = a * (la - lb)
        return (w * (torch.exp(d) - d - 1)).sum(-1) / a**2
    return 0.5 * (w * (la - lb) ** 2).sum(-1)


def ref_tv(la, lb, w=None):
    term = (torch.exp(la) - torch.exp(lb)).abs()
    if w is not None:
        term = term * w
    return 0.5 * term.sum(-1)


def ref_log_arith(la, lb, beta):
    """log(β a + (1 − β) b), exact at zeros (not renormalised)."""
    fa, fb = la > NINF, lb > NINF
    valid = fa | fb
    x = torch.where(fa, math.log(beta) + torch.where(fa, la, torch.zeros_like(la)), torch.full_like(la, NINF))
    y = torch.where(fb, math.log(1 - beta) + torch.where(fb, lb, torch.zeros_like(lb)), torch.full_like(lb, NINF))
    x = torch.where(valid, x, torch.zeros_like(x))
    y = torch.where(valid, y, torch.zeros_like(y))
    return torch.where(valid, torch.logaddexp(x, y), torch.full_like(la, NINF))


def ref_jsd(la, lb, beta, w=None):
    if beta == 0.0 or beta == 1.0:
        return torch.zeros(la.shape[:-1], dtype=la.dtype)
    lm = ref_log_arith(la, lb, beta)
    return beta * ref_kl(la, lm, w) + (1 - beta) * ref_kl(lb, lm, w)


def ref_div(la, lb, kw, w=None):
    d = kw.get("divergence", "kl")
    if d == "kl":
        return ref_kl(la, lb, w)
    if d == "ab":
        return ref_ab(la, lb, kw.get("ab_alpha", 0.2), kw.get("ab_beta", 0.7), w)
    if d == "tv":
        return ref_tv(la, lb, w)
    if d == "jsd":
        return ref_jsd(la, lb, kw.get("jsd_beta", 0.5), w)
    raise ValueError(d)


def ref_pair(lp, lq, kw):
    lq_r = lq.detach() if kw.get("stop_grad_r", False) else lq
    lr = ref_log_mixture(lp, lq_r, kw["alpha"], kw["lam"])
    return {"pr": (lp, lr), "rp": (lr, lp), "qr": (lq, lr), "rq": (lr, lq)}[kw["order"]]


def ref_full(zs, zt, kw):
    lq = torch.log_softmax(zs, -1)
    lp = torch.log_softmax(zt, -1)
    la, lb = ref_pair(lp, lq, kw)
    return ref_div(la, lb, kw)


def _safe_lse(x):
    """logsumexp over the last dim; −inf (with zero gradient) for all −inf rows."""
    ok = (x > NINF).any(-1, keepdim=True)
    x0 = torch.where(ok, x, torch.zeros_like(x))
    return torch.where(ok.squeeze(-1), torch.logsumexp(x0, -1), torch.full(x.shape[:-1], NINF, dtype=x.dtype))


def ref_student_bins(zs, ids, s=None):
    lq = torch.log_softmax(zs, -1)
    in_s = torch.zeros_like(lq, dtype=torch.bool).scatter(-1, ids, True)
    lq_out = torch.where(in_s, torch.full_like(lq, NINF), lq)
    lq_tail = _safe_lse(lq_out)
    lq_s = lq.gather(-1, ids)
    gamma = None
    if s is not None:
        scaled = torch.where(lq_out > NINF, s * torch.where(lq_out > NINF, lq_out, torch.zeros_like(lq_out)),
                             torch.full_like(lq_out, NINF))
        lg = _safe_lse(scaled) - s * lq_tail
        gamma = torch.where(lq_tail > NINF, torch.exp(torch.where(lq_tail > NINF, lg, torch.zeros_like(lg))),
                            torch.ones_like(lg))
    return lq_s, lq_tail, gamma


def ref_sparse(zs, ids, tlp, tail_lm, kw):
    tail = kw.get("tail", "bucket")
    div = kw.get("divergence", "kl")
    s = kw.get("ab_alpha", 0.2) + kw.get("ab_beta", 0.7)
    want_gamma = div == "ab" and tail == "bucket"
    lq_s, lq_tail, gamma = ref_student_bins(zs, ids, s if want_gamma else None)
    if tail == "renorm":
        lp_bar = ref_normalise(tlp)
        lq_bar = ref_normalise(lq_s)
        w = None
    else:
        lp_bar = ref_normalise(torch.cat([tlp, tail_lm[:, None]], -1))
        lq_bar = torch.cat([lq_s, lq_tail[:, None]], -1)
        w = None
        if want_gamma:
            k = ids.shape[-1]
            w = torch.cat([torch.ones(ids.shape[0], k, dtype=gamma.dtype), gamma[:, None]], -1)
    la, lb = ref_pair(lp_bar, lq_bar, kw)
    return ref_div(la, lb, kw, w)


# ---------------------------------------------------------------------------------------------
# Data helpers
# ---------------------------------------------------------------------------------------------


def make_cache(zt, k):
    """Top-k cache from teacher logits: (ids, log p(S), log p_tail) computed in float64."""
    lp = torch.log_softmax(zt.double(), -1)
    ids = torch.topk(lp, k, dim=-1).indices
    in_s = torch.zeros_like(lp, dtype=torch.bool).scatter(-1, ids, True)
    tail = _safe_lse(torch.where(in_s, torch.full_like(lp, NINF), lp))
    return ids, lp.gather(-1, ids), tail


def imputed_teacher(zs, ids, tlp, tail_lm):
    """Full-vocab teacher log-probs: cached on S, p_tail · q(x)/q_tail outside S."""
    lq = torch.log_softmax(zs.double(), -1)
    lq_s, lq_tail, _ = ref_student_bins(zs.double(), ids)
    out = tail_lm[:, None] + lq - lq_tail[:, None]
    return out.scatter(-1, ids, tlp)


def random_case(seed, n=6, v=12, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, v, generator=g, dtype=F64) * scale
    zt = torch.randn(n, v, generator=g, dtype=F64) * scale
    return zs, zt


def zipf_zero_case(seed, v=12):
    """Peaked Zipf-like rows with exact zeros in varied patterns (8 rows)."""
    g = torch.Generator().manual_seed(seed)
    rows_t, rows_s = [], []
    for i in range(8):
        rt = torch.randperm(v, generator=g).double()
        rs = rt.clone()
        # student ranks mostly agree with teacher, with a few swaps
        perm = torch.randperm(v, generator=g)[:4]
        rs[perm] = rs[perm.flip(0)]
        zt = -2.5 * torch.log1p(rt) + 0.3 * torch.randn(v, generator=g, dtype=F64)
        zs = -1.5 * torch.log1p(rs) + 0.3 * torch.randn(v, generator=g, dtype=F64)
        order_t = torch.argsort(zt, descending=True)
        low = order_t[-4:]  # teacher's lowest entries (outside a top-5)
        top = order_t[:5]
        if i == 0:  # teacher zeros only
            zt[low[:2]] = NINF
        elif i == 1:  # student zeros only, one of them on a teacher top-k token
            zs[low[0]] = NINF
            zs[top[3]] = NINF
        elif i == 2:  # shared zeros (padding)
            zt[low[:2]] = NINF
            zs[low[:2]] = NINF
        elif i == 3:  # disjoint zero sets
            zt[low[:2]] = NINF
            zs[low[2:]] = NINF
        elif i == 4:  # very peaked, no zeros
            zt = 4.0 * zt
        elif i == 5:  # mixed
            zt[low[:3]] = NINF
            zs[low[1]] = NINF
            zs[top[4]] = NINF
        elif i == 6:  # teacher has only 4 non-zero entries: a zero inside a top-5 and p_tail = 0
            zt[order_t[4:]] = NINF
        else:  # teacher mass only on its top 5 (p_tail = 0); student zero on one of them
            zt[order_t[5:]] = NINF
            zs[top[1]] = NINF
        rows_t.append(zt)
        rows_s.append(zs)
    return torch.stack(rows_s), torch.stack(rows_t)


def cfg(**kw):
    return LossConfig(**kw)


def _grad(fn, z):
    """Value of fn(z) and the gradient of the sum of its finite rows (rows: mask)."""
    z = z.detach().clone().requires_grad_(True)
    return _finite_rows_grad(fn(z), z)


def _ref_grad(fn, z):
    """Reference gradient: leaf on the finite logits only; −inf logits are constants (gradient 0)."""
    mask = z > NINF
    leaf = torch.where(mask, z, torch.zeros_like(z)).detach().requires_grad_(True)
    zz = torch.where(mask, leaf, torch.full_like(z, NINF))
    return _finite_rows_grad(fn(zz), leaf)


def _finite_rows_grad(out, leaf):
    """(out, d Σ_finite out / d leaf, finite mask); a zero gradient where nothing depends on leaf."""
    fin = torch.isfinite(out.detach())
    g = None
    if out.requires_grad and fin.any():
        (g,) = torch.autograd.grad(out[fin].sum(), leaf, allow_unused=True)
    return out.detach(), torch.zeros_like(leaf) if g is None else g, fin


def compare(impl_fn, ref_fn, z, label, rtol=1e-9, atol=1e-12, grad_rtol=1e-7, check_grad=True):
    """Compare values (and finite-row gradients) of impl vs reference. Returns error strings."""
    errs = []
    got, g_got, _ = _grad(impl_fn, z)
    want, g_want, fin = _ref_grad(ref_fn, z)
    if got.dtype != want.dtype:
        errs.append(f"{label}: dtype {got.dtype} != {want.dtype}")
    if torch.isnan(got).any():
        errs.append(f"{label}: NaN loss rows {torch.nonzero(torch.isnan(got)).flatten().tolist()}")
    for i in range(want.shape[0]):
        w, g = want[i].item(), got[i].item()
        if math.isnan(w):
            errs.append(f"{label}: reference NaN row {i} (test bug)")
        elif math.isinf(w):
            if not (math.isinf(g) and g > 0):
                errs.append(f"{label}: row {i} expected +inf got {g!r}")
        elif not (abs(g - w) <= atol + rtol * abs(w)):
            errs.append(f"{label}: row {i} loss expected {w!r} got {g!r} (rel {abs(g - w) / max(abs(w), 1e-300):.2e})")
    if check_grad and fin.any():
        gg, gw = g_got[fin], g_want[fin]
        if not torch.isfinite(gg).all():
            bad = torch.nonzero(~torch.isfinite(g_got) & fin[:, None])[:, 0].unique().tolist()
            errs.append(f"{label}: non-finite gradient in finite-loss rows {bad}")
        else:
            scale = gw.abs().max().item() if gw.numel() else 0.0
            tol = grad_rtol * gw.abs() + 1e-10 * max(1.0, scale)
            if not ((gg - gw).abs() <= tol).all():
                err = ((gg - gw).abs() - tol).max().item()
                errs.append(f"{label}: gradient mismatch, max abs err {(gg - gw).abs().max().item():.3e} "
                            f"(excess {err:.2e}, |g_ref|max {scale:.3e})")
    return errs


def full_pair(zt, kw):
    impl = lambda z: full_loss(z, zt, cfg(**kw))  # noqa: E731
    ref = lambda z: ref_full(z, zt, kw)  # noqa: E731
    return impl, ref


def sparse_pair(zt, k, kw):
    ids, tlp, tail = make_cache(zt, k)
    impl = lambda z: sparse_loss(z, ids, tlp, tail, cfg(**kw))  # noqa: E731
    ref = lambda z: ref_sparse(z, ids, tlp, tail, kw)  # noqa: E731
    return impl, ref


# ---------------------------------------------------------------------------------------------
# 0. Self-checks of the reference (no amid involved)
# ---------------------------------------------------------------------------------------------


def _pos_dists(seed, n=4, v=9):
    zs, zt = random_case(seed, n, v)
    return torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)


@pytest.mark.parametrize("a,b", [(1.3, 0.0), (0.0, 0.8), (0.6, -0.6), (-0.7, 0.7), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0)])
def test_reference_ab_limits_continuous(a, b):
    lp, lq = _pos_dists(0)
    # the generic formula loses ~1/(a b) digits near (0, 0), so step further out there
    eps, rtol = (1e-4, 1e-3) if a == b == 0 else (1e-6, 1e-4)
    lim = ref_ab(lp, lq, a, b)
    for da, db in [(eps, eps * 0.37), (-eps * 0.61, eps), (eps * 0.5, -eps * 1.3)]:
        near = ref_ab(lp, lq, a + da, b + db)
        torch.testing.assert_close(near, lim, rtol=rtol, atol=1e-8)


def test_reference_ab_special_cases():
    lp, lq = _pos_dists(1)
    p, q = lp.exp(), lq.exp()
    kl = (p * (lp - lq)).sum(-1)
    torch.testing.assert_close(ref_ab(lp, lq, 1.0, 0.0), kl)
    torch.testing.assert_close(ref_ab(lp, lq, 0.0, 1.0), (q * (lq - lp)).sum(-1))
    torch.testing.assert_close(ref_ab(lp, lq, 0.5, 0.5), 2 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1))
    torch.testing.assert_close(ref_ab(lp, lq, 0.0, 0.0), 0.5 * ((lp - lq) ** 2).sum(-1))


def test_reference_mixture_against_probability_space():
    lp, lq = _pos_dists(2)
    p, q = lp.exp().numpy(), lq.exp().numpy()
    for alpha in (-3.0, -1.0, 0.0, 0.5, 2.0, 3.0, 7.0):
        for lam in (0.2, 0.7):
            c = (1 - alpha) / 2
            rt = (lam * p**c + (1 - lam) * q**c) ** (1 / c)
            r = rt / rt.sum(-1, keepdims=True)
            np.testing.assert_allclose(ref_log_mixture(lp, lq, alpha, lam).exp().numpy(), r, rtol=1e-12)


def test_reference_sparse_equals_imputed_full():
    zs, zt = random_case(3, 4, 10)
    ids, tlp, tail = make_cache(zt, 4)
    lpi = imputed_teacher(zs, ids, tlp, tail)
    for div in ("kl", "ab", "tv", "jsd"):
        for order in ORDERS:
            kw = dict(alpha=2.5, lam=0.4, divergence=div, order=order)
            torch.testing.assert_close(ref_sparse(zs, ids, tlp, tail, kw), ref_full(zs, lpi, kw), rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# 2. The grid: every order × {kl, ab} × α × λ, full and sparse, random and Zipf-with-zeros
# ---------------------------------------------------------------------------------------------


def _grid_batch():
    """Rows 0–5: random distributions; rows 6–11: peaked Zipf-like rows with exact zeros."""
    zs_a, zt_a = random_case(10)
    zs_b, zt_b = zipf_zero_case(11)
    return torch.cat([zs_a, zs_b]), torch.cat([zt_a, zt_b])


GRID_BATCH = _grid_batch()


def _grid_errors(entry, order, div, alpha, lams=GRID_LAMS, extra=None):
    errs = []
    zs, zt = GRID_BATCH
    for lam in lams:
        kw = dict(alpha=alpha, lam=lam, divergence=div, order=order, **(extra or {}))
        impl, ref = full_pair(zt, kw) if entry == "full" else sparse_pair(zt, 5, kw)
        errs += compare(impl, ref, zs, f"[{entry} {div} {order} α={alpha} λ={lam} (rows 6+ have zeros, 12-13 zero teacher tail)]")
    return errs


@pytest.mark.parametrize("alpha", GRID_ALPHAS)
@pytest.mark.parametrize("div", ["kl", "ab"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("entry", ["full", "sparse"])
def test_grid(entry, order, div, alpha):
    errs = _grid_errors(entry, order, div, alpha)
    assert not errs, "\n".join(errs)


@pytest.mark.parametrize("alpha", [-3.0, -1.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("div", ["tv", "jsd"])
@pytest.mark.parametrize("entry", ["full", "sparse"])
def test_grid_tv_jsd(entry, div, alpha):
    errs = []
    for order in ORDERS:
        errs += _grid_errors(entry, order, div, alpha, lams=(0.0, 0.3, 1.0))
    assert not errs, "\n".join(errs)


@pytest.mark.parametrize("alpha", [NINF, INF])
@pytest.mark.parametrize("entry", ["full", "sparse"])
def test_grid_infinite_alpha(entry, alpha):
    errs = []
    for order in ORDERS:
        for div in ("kl", "ab"):
            errs += _grid_errors(entry, order, div, alpha, lams=(0.0, 0.5, 1.0))
    assert not errs, "\n".join(errs)


@pytest.mark.parametrize("entry", ["full", "sparse"])
def test_grid_stop_grad_r(entry):
    errs = []
    for order in ORDERS:
        for div in ("kl", "ab", "jsd"):
            for alpha in (-1.0, 0.5, 1.0, 3.0):
                errs += _grid_errors(entry, order, div, alpha, lams=(0.3,), extra=dict(stop_grad_r=True))
    assert not errs, "\n".join(errs)


@pytest.mark.parametrize("entry", ["full", "sparse"])
@pytest.mark.parametrize("ab", [(1.0, 0.0), (0.0, 1.0), (0.5, -0.5), (0.0, 0.0), (1.5, 0.0), (0.5, 0.5), (2.0, -0.5)])
def test_ab_parameters_and_limits(entry, ab):
    """α-β with its limits (a_ or b_ or a_+b_ = 0) on strictly positive distributions."""
    zs, zt = random_case(20, 4, 10)
    errs = []
    for order in ORDERS:
        for alpha in (-1.0, 0.5, 3.0):
            kw = dict(alpha=alpha, lam=0.4, divergence="ab", order=order, ab_alpha=ab[0], ab_beta=ab[1])
            impl, ref = full_pair(zt, kw) if entry == "full" else sparse_pair(zt, 4, kw)
            errs += compare(impl, ref, zs, f"[{entry} ab={ab} {order} α={alpha}]", rtol=1e-8)
    assert not errs, "\n".join(errs)


def decimal_ab(la: torch.Tensor, lb: torch.Tensor, a: float, b: float) -> list[float]:
    """The textbook α-β divergence per row in 80-digit decimal arithmetic, from the exact binary
    values of the log-probabilities and of (a, b): its cancellation near a parameter limit (or
    where x ≈ y) costs digits that 80 do not run out of. a, b, a + b nonzero."""
    import decimal

    with decimal.localcontext(decimal.Context(prec=80)):  # every operator below, not only named calls
        a_, b_ = decimal.Decimal(a), decimal.Decimal(b)
        s_ = a_ + b_
        out = []
        for row_a, row_b in zip(la.tolist(), lb.tolist()):
            total = decimal.Decimal(0)
            for u, v in zip(row_a, row_b):
                u, v = decimal.Decimal(u), decimal.Decimal(v)
                total += (a_ * u + b_ * v).exp() - a_ / s_ * (s_ * u).exp() - b_ / s_ * (s_ * v).exp()
            out.append(float(-total / (a_ * b_)))
    return out


NEAR_LIMITS = [(0.1 + 0.2 - 0.3, 0.7), (1e-9, 0.7), (0.2, 1e-9), (0.2, -0.2 + 1e-9), (1e-9, 1e-9),
               (0.1 + 0.2 - 0.3, 0.1 + 0.2 - 0.3), (1e-6, -5e-7), (1e-3, 1e-3), (0.2, 0.7), (-0.3, 1.2)]


@pytest.mark.parametrize("ab", NEAR_LIMITS)
def test_ab_near_its_limits_keeps_full_accuracy(ab):
    """(a_, b_) near but not at a limit (a sweep's 0.1 + 0.2 − 0.3 is 5.6e-17): the textbook
    formula cancels there (it gave a negative divergence at (1e-9, 1e-9)); amid must not."""
    zs, zt = random_case(40, 3, 9)
    kw = cfg(lam=0.0, divergence="ab", ab_alpha=ab[0], ab_beta=ab[1])
    lp, lq = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
    want = torch.tensor(decimal_ab(lp, lq, *ab), dtype=F64)
    torch.testing.assert_close(full_loss(zs, zt, kw), want, rtol=1e-13, atol=0)
    z32 = zs.float()
    lp32, lq32 = torch.log_softmax(zt.float(), -1), torch.log_softmax(z32, -1)
    want32 = torch.tensor(decimal_ab(lp32.double(), lq32.double(), *ab), dtype=F64)
    torch.testing.assert_close(full_loss(z32, zt.float(), kw).double(), want32, rtol=2e-6, atol=0)
    z = zs.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: full_loss(x, zt, kw), (z,))


@pytest.mark.parametrize("ab", [(1.0, 0.0), (0.0, 1.0), (0.5, -0.5), (0.0, 0.0), (1.3, 0.0), (0.0, 0.8),
                                (1e-9, 0.7), (0.2, 0.7), (-0.3, 1.2)])
def test_ab_on_a_bin_where_one_side_is_zero_is_the_limit_never_nan(ab):
    """x = 0 < y (or y = 0 < x) in one bin: the value is the limit of the term as x → 0 (finite
    where a and a + b are positive, else +inf), at limit parameters too (0·inf gave NaN)."""
    from amid.divergences import alpha_beta

    a, b = ab
    other = torch.tensor([[math.log(0.3)]], dtype=F64, requires_grad=True)
    zero = torch.tensor([[NINF]], dtype=F64)
    for x_is_zero, finite in ((True, a > 0 and a + b > 0), (False, b > 0 and a + b > 0)):
        pair = (zero, other) if x_is_zero else (other, zero)
        value = alpha_beta(*pair, a, b, exact=True)
        if finite:
            # Near 0 means x^a ≈ 0 as well as x^(a+b): log x = −60 / the smaller exponent.
            own = a if x_is_zero else b
            tiny = torch.tensor([[-60.0 / min(own, a + b)]], dtype=F64)
            near = alpha_beta(*((tiny, other) if x_is_zero else (other, tiny)), a, b, exact=True)
            torch.testing.assert_close(value, near, rtol=1e-9, atol=0)
            (grad,) = torch.autograd.grad(value.sum(), other)
            assert torch.isfinite(grad).all(), (ab, x_is_zero, grad)
        else:
            assert value.item() == INF, (ab, x_is_zero, value)


@pytest.mark.parametrize("ab,exact", [((0.05, 0.7), False), ((0.2, 0.7), True)])
def test_ab_of_nearly_equal_distributions_keeps_its_relative_accuracy_in_float32(ab, exact):
    """Near convergence (q ≈ p) each α-β term is ~(log x − log y)²/2 · x^(a+b), far below the
    textbook formula's three O(1/(ab)) terms, which cancel to noise in float32 (276 % off at
    (0.2, 0.7) here). The exact form serves parameters near a limit, and the sparse loss's k + 1
    bins always (`exact`)."""
    from amid.divergences import alpha_beta

    zt = random_case(41, 4, 50)[1].float()
    lp = torch.log_softmax(zt, -1)
    lq = torch.log_softmax(zt + 1e-3 * torch.randn(zt.shape, generator=torch.Generator().manual_seed(0)), -1)
    want = torch.tensor(decimal_ab(lp.double(), lq.double(), *ab), dtype=F64)
    torch.testing.assert_close(alpha_beta(lp, lq, *ab, exact=exact).double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("tail", ["renorm", "bucket_unweighted"])
def test_sparse_tail_modes_match_reference(tail):
    zs, zt = random_case(21, 5, 11)
    errs = []
    for div in ("kl", "ab", "jsd", "tv"):
        for order in ORDERS:
            kw = dict(alpha=0.5, lam=0.3, divergence=div, order=order, tail=tail)
            impl, ref = sparse_pair(zt, 4, kw)
            errs += compare(impl, ref, zs, f"[{tail} {div} {order}]")
    assert not errs, "\n".join(errs)


def test_default_tail_is_bucket():
    assert LossConfig(alpha=0.5, lam=0.1, divergence="kl", order="pr").tail == "bucket"


# ---------------------------------------------------------------------------------------------
# 3. gradcheck
# ---------------------------------------------------------------------------------------------

GRADCHECK_CFGS = [
    dict(alpha=0.5, lam=0.4, divergence="kl", order="pr"),
    dict(alpha=-3.0, lam=0.7, divergence="kl", order="rq"),
    dict(alpha=3.0, lam=0.3, divergence="ab", order="qr"),
    dict(alpha=1.0, lam=0.5, divergence="ab", order="rp", ab_alpha=0.2, ab_beta=0.7),
    dict(alpha=2.0, lam=0.5, divergence="ab", order="rq", ab_alpha=0.5, ab_beta=1.5),
    dict(alpha=0.0, lam=0.6, divergence="jsd", order="qr"),
    dict(alpha=-1.0, lam=0.3, divergence="tv", order="pr"),
]
STOPGRAD_CFGS = [
    dict(alpha=0.0, lam=0.6, divergence="jsd", order="pr", stop_grad_r=True),
    dict(alpha=1.0, lam=0.4, divergence="kl", order="rq", stop_grad_r=True),
    dict(alpha=2.0, lam=0.5, divergence="ab", order="pr", stop_grad_r=True),
    dict(alpha=-3.0, lam=0.5, divergence="ab", order="qr", stop_grad_r=True),
]


def _ids(kw):
    return "-".join(f"{v}" for v in kw.values())


@pytest.mark.parametrize("kw", GRADCHECK_CFGS, ids=_ids)
def test_gradcheck_full(kw):
    zs, zt = random_case(30, 3, 7)
    zs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: full_loss(z, zt, cfg(**kw)), (zs,))


@pytest.mark.parametrize("kw", GRADCHECK_CFGS, ids=_ids)
def test_gradcheck_sparse(kw):
    zs, zt = random_case(31, 3, 8)
    ids, tlp, tail = make_cache(zt, 3)
    zs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: sparse_loss(z, ids, tlp, tail, cfg(**kw)), (zs,))


def _frozen_r_loss(entry, z, zt, kw, z0, cache):
    """The stop_grad_r objective as a plain function of z: r built once from the student at z0."""
    if entry == "full":
        lp, lq, lq0 = torch.log_softmax(zt, -1), torch.log_softmax(z, -1), torch.log_softmax(z0, -1)
    else:
        ids, tlp, tail = cache
        lp = ref_normalise(torch.cat([tlp, tail[:, None]], -1))
        lq_s, lq_t, _ = ref_student_bins(z, ids)
        lq_s0, lq_t0, _ = ref_student_bins(z0, ids)
        lq, lq0 = torch.cat([lq_s, lq_t[:, None]], -1), torch.cat([lq_s0, lq_t0[:, None]], -1)
    lr = ref_log_mixture(lp, lq0, kw["alpha"], kw["lam"])
    la, lb = {"pr": (lp, lr), "rp": (lr, lp), "qr": (lq, lr), "rq": (lr, lq)}[kw["order"]]
    w = None
    if entry == "sparse" and kw["divergence"] == "ab":
        s = kw.get("ab_alpha", 0.2) + kw.get("ab_beta", 0.7)
        gamma = ref_student_bins(z, cache[0], s)[2]
        w = torch.cat([torch.ones(z.shape[0], cache[0].shape[1], dtype=z.dtype), gamma[:, None]], -1)
    return ref_div(la, lb, kw, w)


@pytest.mark.parametrize("entry", ["full", "sparse"])
@pytest.mark.parametrize("kw", STOPGRAD_CFGS, ids=_ids)
def test_stop_grad_r_gradient_by_finite_differences(entry, kw):
    """gradcheck cannot freeze r, so: analytic gradient vs central differences with r held fixed."""
    zs, zt = random_case(32, 3, 8)
    cache = make_cache(zt, 3)
    z = zs.clone().requires_grad_(True)
    out = full_loss(z, zt, cfg(**kw)) if entry == "full" else sparse_loss(z, *cache, cfg(**kw))
    g = torch.autograd.grad(out.sum(), z, allow_unused=True)[0] if out.requires_grad else None
    g = torch.zeros_like(zs) if g is None else g
    torch.testing.assert_close(out, _frozen_r_loss(entry, zs, zt, kw, zs, cache), rtol=1e-10, atol=1e-13)
    eps = 1e-6
    num = torch.zeros_like(zs)
    for i in range(zs.shape[0]):
        for j in range(zs.shape[1]):
            e = torch.zeros_like(zs)
            e[i, j] = eps
            up = _frozen_r_loss(entry, zs + e, zt, kw, zs, cache).sum()
            dn = _frozen_r_loss(entry, zs - e, zt, kw, zs, cache).sum()
            num[i, j] = (up - dn) / (2 * eps)
    torch.testing.assert_close(g, num, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# 4. SPEC §2 facts about the mixture
# ---------------------------------------------------------------------------------------------


def _mix_np(lp, lq, alpha, lam):
    return log_alpha_mixture(lp, lq, alpha, lam).exp().numpy()


def _norm_np(x):
    return x / x.sum(-1, keepdims=True)


def test_mixture_keeps_float64_and_shape():
    lp, lq = _pos_dists(40, 3, 6)
    out = log_alpha_mixture(lp, lq, 0.5, 0.3)
    assert out.dtype == F64 and out.shape == lp.shape
    np.testing.assert_allclose(out.exp().sum(-1).numpy(), 1.0, rtol=1e-13)


@pytest.mark.parametrize("alpha", GRID_ALPHAS + (NINF, INF))
def test_mixture_lambda_endpoints_exact(alpha):
    zs, zt = zipf_zero_case(41)
    lp, lq = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
    r1 = log_alpha_mixture(lp, lq, alpha, 1.0)
    r0 = log_alpha_mixture(lp, lq, alpha, 0.0)
    assert not torch.isnan(r1).any() and not torch.isnan(r0).any()
    np.testing.assert_allclose(r1.exp().numpy(), lp.exp().numpy(), rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(r0.exp().numpy(), lq.exp().numpy(), rtol=1e-13, atol=1e-300)
    assert torch.equal(torch.isneginf(r1), torch.isneginf(lp))
    assert torch.equal(torch.isneginf(r0), torch.isneginf(lq))


@pytest.mark.parametrize("lam", [0.1, 0.5, 0.83])
def test_mixture_closed_forms(lam):
    lp, lq = _pos_dists(42, 4, 9)
    p, q = lp.exp().numpy(), lq.exp().numpy()
    # α = −1: arithmetic, already normalised
    np.testing.assert_allclose(_mix_np(lp, lq, -1.0, lam), lam * p + (1 - lam) * q, rtol=1e-12)
    # α = 0: squared mean of square roots
    np.testing.assert_allclose(_mix_np(lp, lq, 0.0, lam), _norm_np((lam * np.sqrt(p) + (1 - lam) * np.sqrt(q)) ** 2), rtol=1e-12)
    # α = 3: weighted harmonic mean
    np.testing.assert_allclose(_mix_np(lp, lq, 3.0, lam), _norm_np(1.0 / (lam / p + (1 - lam) / q)), rtol=1e-12)
    # α = 1: geometric
    np.testing.assert_allclose(_mix_np(lp, lq, 1.0, lam), _norm_np(p**lam * q ** (1 - lam)), rtol=1e-12)


@pytest.mark.parametrize("lam", [0.1, 0.5, 0.83])
def test_mixture_continuity_at_alpha_one(lam):
    zs, zt = zipf_zero_case(43)
    lp, lq = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
    geo = _mix_np(lp, lq, 1.0, lam)
    prev = None
    for eps in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        for sgn in (1, -1):
            near = _mix_np(lp, lq, 1.0 + sgn * eps, lam)
            assert not np.isnan(near).any()
            err = np.abs(near - geo).max()
            assert err <= 1000 * eps, (eps, sgn, err)
        prev = err
    assert prev < 1e-3


def test_mixture_large_alpha_max_min():
    lp, lq = _pos_dists(44, 4, 9)
    p, q = lp.exp().numpy(), lq.exp().numpy()
    mx, mn = _norm_np(np.maximum(p, q)), _norm_np(np.minimum(p, q))
    # |α| = 50: within the 2^(1/c) ≈ 3 % worst case of the limit
    np.testing.assert_allclose(_mix_np(lp, lq, -50.0, 0.5), mx, rtol=3e-2)
    np.testing.assert_allclose(_mix_np(lp, lq, 50.0, 0.5), mn, rtol=3e-2)
    # and closer than α = ±3 is
    assert np.abs(_mix_np(lp, lq, -50.0, 0.5) - mx).max() < np.abs(_mix_np(lp, lq, -3.0, 0.5) - mx).max()
    assert np.abs(_mix_np(lp, lq, 50.0, 0.5) - mn).max() < np.abs(_mix_np(lp, lq, 3.0, 0.5) - mn).max()
    # the limits themselves, for any λ in (0, 1)
    for lam in (0.2, 0.5, 0.9):
        np.testing.assert_allclose(_mix_np(lp, lq, NINF, lam), mx, rtol=1e-12)
        np.testing.assert_allclose(_mix_np(lp, lq, INF, lam), mn, rtol=1e-12)


def test_mixture_alpha_gt_one_zero_where_either_zero():
    zs, zt = zipf_zero_case(45)
    lp, lq = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
    for alpha in (1.0, 1.001, 3.0, 50.0, INF):
        r = log_alpha_mixture(lp, lq, alpha, 0.5)
        assert not torch.isnan(r).any()
        assert torch.equal(torch.isneginf(r), torch.isneginf(lp) | torch.isneginf(lq)), alpha
    for alpha in (-50.0, -1.0, 0.0, 0.999, NINF):
        r = log_alpha_mixture(lp, lq, alpha, 0.5)
        assert not torch.isnan(r).any()
        assert torch.equal(torch.isneginf(r), torch.isneginf(lp) & torch.isneginf(lq)), alpha


@pytest.mark.parametrize("alpha", GRID_ALPHAS + (NINF, INF))
def test_mixture_matches_reference_with_zeros(alpha):
    zs, zt = zipf_zero_case(46)
    lp, lq = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
    for lam in GRID_LAMS:
        got = log_alpha_mixture(lp, lq, alpha, lam).exp()
        want = ref_log_mixture(lp, lq, alpha, lam).exp()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("alpha", GRID_ALPHAS + (NINF, INF))
def test_mixture_q_equals_p(alpha):
    _, zt = zipf_zero_case(47)
    lp = torch.log_softmax(zt, -1)
    for lam in GRID_LAMS:
        r = log_alpha_mixture(lp, lp.clone(), alpha, lam)
        assert not torch.isnan(r).any()
        np.testing.assert_allclose(r.exp().numpy(), lp.exp().numpy(), rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize("div", ["kl", "ab", "tv", "jsd"])
def test_full_zero_loss_at_q_equals_p(div):
    zs, zt = random_case(48, 4, 9)
    for order in ORDERS:
        for alpha in (-50.0, -1.0, 0.5, 1.0, 3.0, 50.0):
            for lam in (0.0, 0.3, 1.0):
                kw = dict(alpha=alpha, lam=lam, divergence=div, order=order)
                out = full_loss(zt + 1.7, zt, cfg(**kw))
                assert out.abs().max().item() < 1e-12, (kw, out)


# ---------------------------------------------------------------------------------------------
# 5. SPEC §4 properties of the (k+1)-bin objective
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("div", ["kl", "ab", "tv", "jsd"])
def test_sparse_k_vminus1_equals_full(div):
    errs = []
    for dname, (zs, zt) in {"random": random_case(50), "zipf0": zipf_zero_case(51)}.items():
        v = zs.shape[-1]
        ids, tlp, tail = make_cache(zt, v - 1)
        for order in ORDERS:
            for alpha in (-3.0, -1.0, 0.5, 1.0, 3.0):
                for lam in (0.0, 0.3, 1.0):
                    kw = dict(alpha=alpha, lam=lam, divergence=div, order=order)
                    a = sparse_loss(zs, ids, tlp, tail, cfg(**kw))
                    b = full_loss(zs, zt, cfg(**kw))
                    assert not torch.isnan(a).any()
                    both_inf = torch.isinf(a) & torch.isinf(b)
                    ok = both_inf | ((a - b).abs() <= 1e-12 + 1e-9 * b.abs())
                    if not ok.all():
                        errs.append(f"[{dname} {div} {order} α={alpha} λ={lam}] sparse {a.tolist()} full {b.tolist()}")
    assert not errs, "\n".join(errs)


@pytest.mark.parametrize("div", ["kl", "ab", "tv", "jsd"])
def test_sparse_zero_tail_mass_equals_full(div):
    """Teacher with exactly zero mass outside S: the (k+1)-bin loss is the full loss."""
    zs, zt = random_case(52, 5, 10)
    ids, _, _ = make_cache(zt, 4)
    in_s = torch.zeros_like(zt, dtype=torch.bool).scatter(-1, ids, True)
    zt = torch.where(in_s, zt, torch.full_like(zt, NINF))
    ids, tlp, tail = make_cache(zt, 4)
    assert torch.isneginf(tail).all()
    errs = []
    for order in ORDERS:
        for alpha in (-3.0, -1.0, 0.5, 1.0, 3.0):
            kw = dict(alpha=alpha, lam=0.4, divergence=div, order=order)
            a = sparse_loss(zs, ids, tlp, tail, cfg(**kw))
            b = full_loss(zs, zt, cfg(**kw))
            both_inf = torch.isinf(a) & torch.isinf(b) & (a > 0) & (b > 0)
            ok = both_inf | ((a - b).abs() <= 1e-12 + 1e-9 * b.abs())
            if torch.isnan(a).any() or not ok.all():
                errs.append(f"[{div} {order} α={alpha}] sparse {a.tolist()} full {b.tolist()}")
    assert not errs, "\n".join(errs)


_alpha_st = st.sampled_from([-50.0, -7.3, -3.0, -1.0, -0.4, 0.0, 0.5, 0.999, 1.0, 1.001, 1.6, 3.0, 8.0, 50.0])
_order_st = st.sampled_from(ORDERS)


@HYP
@given(seed=st.integers(0, 10_000), v=st.integers(4, 14), kfrac=st.floats(0.05, 0.95),
       lam=st.floats(0.01, 0.99), order=_order_st)
def test_dpi_sparse_le_full(seed, v, kfrac, lam, order):
    zs, zt = random_case(seed, 3, v, scale=2.5)
    k = max(1, min(v - 2, int(kfrac * v)))
    ids, tlp, tail = make_cache(zt, k)
    configs = [LossConfig.preset("kd"), LossConfig.preset("rkl"),
               cfg(alpha=-1.0, lam=lam, divergence="kl", order=order)]
    for c in configs:
        a = sparse_loss(zs, ids, tlp, tail, c)
        b = full_loss(zs, zt, c)
        assert (a <= b + 1e-12 * (1 + b.abs())).all(), (c, a, b)
        assert (a >= -1e-13).all()


@HYP
@given(seed=st.integers(0, 10_000), v=st.integers(4, 14), kfrac=st.floats(0.05, 0.95),
       alpha=_alpha_st, lam=st.sampled_from([0.0, 0.1, 0.37, 0.5, 0.9, 1.0]), order=_order_st,
       div=st.sampled_from(["kl", "tv", "jsd", "ab"]), stop=st.booleans())
def test_sparse_equals_full_against_imputed_teacher(seed, v, kfrac, alpha, lam, order, div, stop):
    zs, zt = random_case(seed, 3, v, scale=2.0)
    k = max(1, min(v - 2, int(kfrac * v)))
    ids, tlp, tail = make_cache(zt, k)
    lpi = imputed_teacher(zs, ids, tlp, tail)
    kw = dict(alpha=alpha, lam=lam, divergence=div, order=order, stop_grad_r=stop)
    a = sparse_loss(zs, ids, tlp, tail, cfg(**kw))
    b = full_loss(zs, lpi, cfg(**kw))
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("ab", [(0.2, 0.7), (0.5, 1.5), (1.0, 0.0)])
def test_ab_bucket_weight_needed(ab):
    """With γ the α-β sparse loss equals the imputed full loss; without γ it does not (a+b ≠ 1)."""
    zs, zt = random_case(53, 4, 40, scale=1.0)
    ids, tlp, tail = make_cache(zt, 6)
    lpi = imputed_teacher(zs, ids, tlp, tail)
    for order in ORDERS:
        kw = dict(alpha=0.5, lam=0.3, divergence="ab", order=order, ab_alpha=ab[0], ab_beta=ab[1])
        full = full_loss(zs, lpi, cfg(**kw))
        bucket = sparse_loss(zs, ids, tlp, tail, cfg(**kw))
        unweighted = sparse_loss(zs, ids, tlp, tail, cfg(**kw, tail="bucket_unweighted"))
        torch.testing.assert_close(bucket, full, rtol=1e-9, atol=1e-13)
        rel = ((unweighted - full).abs() / full.abs()).min().item()
        if ab[0] + ab[1] == 1.0:
            torch.testing.assert_close(unweighted, bucket, rtol=1e-12, atol=1e-14)
        else:
            assert rel > 1e-4, (order, rel)


def test_kl_tail_modes_bucket_unweighted_same_as_bucket():
    zs, zt = random_case(54, 4, 12)
    ids, tlp, tail = make_cache(zt, 4)
    for order in ORDERS:
        kw = dict(alpha=0.5, lam=0.3, divergence="kl", order=order)
        torch.testing.assert_close(sparse_loss(zs, ids, tlp, tail, cfg(**kw, tail="bucket_unweighted")),
                                   sparse_loss(zs, ids, tlp, tail, cfg(**kw)), rtol=1e-13, atol=1e-15)


def test_renorm_is_a_different_objective():
    zs, zt = random_case(55, 4, 12)
    ids, tlp, tail = make_cache(zt, 3)
    kw = dict(alpha=0.5, lam=0.3, divergence="kl", order="pr")
    a = sparse_loss(zs, ids, tlp, tail, cfg(**kw))
    b = sparse_loss(zs, ids, tlp, tail, cfg(**kw, tail="renorm"))
    assert ((a - b).abs() > 1e-4).all()


@HYP
@given(seed=st.integers(0, 10_000), v=st.integers(4, 14), kfrac=st.floats(0.05, 0.95),
       alpha=_alpha_st, lam=st.floats(0.05, 0.95), order=_order_st,
       div=st.sampled_from(["kl", "jsd", "ab"]), stop=st.booleans())
def test_sparse_minimum_at_q_equals_p(seed, v, kfrac, alpha, lam, order, div, stop):
    _, zt = random_case(seed, 3, v, scale=2.0)
    k = max(1, min(v - 1, int(kfrac * v)))
    ids, tlp, tail = make_cache(zt, k)
    kw = dict(alpha=alpha, lam=lam, divergence=div, order=order, stop_grad_r=stop)
    z = (zt + 0.9).clone().requires_grad_(True)
    out = sparse_loss(z, ids, tlp, tail, cfg(**kw))
    assert out.abs().max().item() < 1e-12
    if out.requires_grad:
        (g,) = torch.autograd.grad(out.sum(), z, allow_unused=True)
        if g is not None:
            assert g.abs().max().item() < 1e-10, g
    zf = (zt + 0.9).clone().requires_grad_(True)
    outf = full_loss(zf, zt, cfg(**kw))
    assert outf.abs().max().item() < 1e-12
    if outf.requires_grad:
        (g,) = torch.autograd.grad(outf.sum(), zf, allow_unused=True)
        if g is not None:
            assert g.abs().max().item() < 1e-10, g


@settings(HYP, max_examples=20)
@given(seed=st.integers(0, 10_000), alpha=_alpha_st, lam=st.floats(0.0, 1.0), order=_order_st,
       div=st.sampled_from(["kl", "jsd", "ab", "tv"]))
def test_losses_nonnegative(seed, alpha, lam, order, div):
    zs, zt = random_case(seed, 3, 9)
    ids, tlp, tail = make_cache(zt, 3)
    kw = dict(alpha=alpha, lam=lam, divergence=div, order=order)
    assert (full_loss(zs, zt, cfg(**kw)) >= -1e-13).all()
    assert (sparse_loss(zs, ids, tlp, tail, cfg(**kw)) >= -1e-13).all()


# ---------------------------------------------------------------------------------------------
# 6. Presets reproduce their textbook formulas
# ---------------------------------------------------------------------------------------------


def _P(lp):
    return lp.exp()


def tb_kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def tb_preset(name, p, q, **o):
    """Textbook formulas on strictly positive probability vectors p (teacher), q (student)."""
    if name == "kd":
        return tb_kl(p, q)
    if name == "rkl":
        return tb_kl(q, p)
    if name == "skl":
        lam = o.get("lam", 0.1)
        return tb_kl(p, lam * p + (1 - lam) * q)
    if name == "srkl":
        return tb_kl(q, 0.9 * p + 0.1 * q)
    if name == "gkd":
        b = o.get("jsd_beta", 0.5)
        m = b * p + (1 - b) * q
        return b * tb_kl(p, m) + (1 - b) * tb_kl(q, m)
    if name == "taid":
        t = o["lam"]
        r = p**t * q.detach() ** (1 - t)
        r = r / r.sum(-1, keepdim=True)
        return tb_kl(r, q)
    if name == "abkd":
        a, b = 0.2, 0.7
        return -(p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)).sum(-1) / (a * b)
    if name == "amid":  # with explicit α, λ, order pr, kl, α ≠ 1
        al, lam = o["alpha"], o["lam"]
        c = (1 - al) / 2
        r = (lam * p**c + (1 - lam) * q**c) ** (1 / c)
        r = r / r.sum(-1, keepdim=True)
        return tb_kl(p, r)
    raise ValueError(name)


PRESET_CASES = [
    ("kd", {}), ("rkl", {}), ("skl", {}), ("skl", {"lam": 0.25}), ("srkl", {}), ("gkd", {}),
    ("gkd", {"jsd_beta": 0.3}), ("taid", {"lam": 0.35}), ("taid", {"lam": 0.8}), ("abkd", {}),
    ("amid", {"alpha": 0.5, "lam": 0.3, "order": "pr", "divergence": "kl"}),
    ("amid", {"alpha": -3.0, "lam": 0.6, "order": "pr", "divergence": "kl"}),
]


@pytest.mark.parametrize("name,over", PRESET_CASES, ids=lambda x: str(x))
def test_preset_textbook_full(name, over):
    zs, zt = random_case(60, 5, 11)
    c = LossConfig.preset(name, **over)
    z1 = zs.clone().requires_grad_(True)
    got = full_loss(z1, zt, c)
    z2 = zs.clone().requires_grad_(True)
    want = tb_preset(name, torch.softmax(zt, -1), torch.softmax(z2, -1), **over)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    (g1,) = torch.autograd.grad(got.sum(), z1)
    (g2,) = torch.autograd.grad(want.sum(), z2)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name,over", [c for c in PRESET_CASES if c[0] != "abkd"], ids=lambda x: str(x))
def test_preset_textbook_sparse(name, over):
    """On k+1 bins the degree-1 presets are their formula applied to p̄, q̄."""
    zs, zt = random_case(61, 5, 11)
    ids, tlp, tail = make_cache(zt, 4)
    c = LossConfig.preset(name, **over)
    z1 = zs.clone().requires_grad_(True)
    got = sparse_loss(z1, ids, tlp, tail, c)
    z2 = zs.clone().requires_grad_(True)
    lq_s, lq_tail, _ = ref_student_bins(z2, ids)
    pbar = torch.cat([tlp, tail[:, None]], -1).exp()
    qbar = torch.cat([lq_s, lq_tail[:, None]], -1).exp()
    want = tb_preset(name, pbar, qbar, **over)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    (g1,) = torch.autograd.grad(got.sum(), z1)
    (g2,) = torch.autograd.grad(want.sum(), z2)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-12)


def test_preset_abkd_sparse_matches_reference():
    zs, zt = random_case(62, 5, 11)
    ids, tlp, tail = make_cache(zt, 4)
    c = LossConfig.preset("abkd")
    kw = dict(alpha=c.alpha, lam=0.0, divergence="ab", order="pr")
    errs = compare(lambda z: sparse_loss(z, ids, tlp, tail, c), lambda z: ref_sparse(z, ids, tlp, tail, kw), zs, "abkd")
    assert not errs, "\n".join(errs)


@pytest.mark.parametrize("t", [0.2, 0.6, 0.95])
def test_taid_gradient_is_kl_of_constant_r(t):
    zs, zt = random_case(63, 4, 10)
    p = torch.softmax(zt, -1)
    q0 = torch.softmax(zs, -1)
    r_const = p**t * q0 ** (1 - t)
    r_const = (r_const / r_const.sum(-1, keepdim=True)).detach()
    z1 = zs.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(full_loss(z1, zt, LossConfig.preset("taid", lam=t)).sum(), z1)
    z2 = zs.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(tb_kl(r_const, torch.softmax(z2, -1)).sum(), z2)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-13)
    # and the stop-gradient matters: the un-detached r gives a different gradient
    z3 = zs.clone().requires_grad_(True)
    cfg_nd = LossConfig.preset("taid", lam=t, stop_grad_r=False)
    (g3,) = torch.autograd.grad(full_loss(z3, zt, cfg_nd).sum(), z3)
    assert (g3 - g1).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# 7. Robustness
# ---------------------------------------------------------------------------------------------

ROBUST_CFGS = [("preset", n, {}) for n in PRESETS if n != "taid"] + [("preset", "taid", {"lam": 0.5})] + [
    ("amid", "amid", dict(alpha=a, lam=0.3, order=o, divergence=d))
    for a in (-3.0, 0.5, 1.0, 3.0) for o, d in (("pr", "kl"), ("rq", "ab"), ("qr", "jsd"), ("rp", "tv"))
]


def _robust_inputs(kind, dtype=torch.float32, n=4, v=16):
    g = torch.Generator().manual_seed(70)
    zs = torch.randn(n, v, generator=g, dtype=F64)
    zt = torch.randn(n, v, generator=g, dtype=F64)
    if kind == "huge":
        zs, zt = zs * 1e4, zt * 1e4
    elif kind == "equal":
        zs = torch.full_like(zs, 3.0)
        zt = torch.full_like(zt, -2.0)
        zt[0] = torch.randn(v, generator=g, dtype=F64)
    elif kind == "padded":
        zs[:, -5:] = NINF
        zt[:, -5:] = NINF
    return zs.to(dtype), zt.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["huge", "equal", "padded"])
@pytest.mark.parametrize("entry", ["full", "sparse"])
def test_robust_no_nan_inf(entry, kind, dtype):
    zs, zt = _robust_inputs(kind, dtype)
    ids, tlp, tail = make_cache(zt, 4)
    tlp, tail = tlp.to(dtype), tail.to(dtype)
    bad = []
    for _, name, over in ROBUST_CFGS:
        c = LossConfig.preset(name, **over)
        z = zs.clone().requires_grad_(True)
        out = full_loss(z, zt, c) if entry == "full" else sparse_loss(z, ids, tlp, tail, c)
        if out.dtype != dtype:
            bad.append(f"{name}{over}: dtype {out.dtype}")
        if not torch.isfinite(out).all():
            bad.append(f"{name}{over}: loss {out.tolist()}")
            continue
        if out.requires_grad:
            (g,) = torch.autograd.grad(out.sum(), z, allow_unused=True)
            if g is not None and not torch.isfinite(g).all():
                bad.append(f"{name}{over}: non-finite grad")
            if kind == "padded" and g is not None and g[:, -5:].abs().max() > 0:
                bad.append(f"{name}{over}: nonzero grad on padded entries")
    assert not bad, "\n".join(bad)


def test_robust_padded_tail_all_zero():
    """k equals the number of real tokens: the tail bin is empty (p_tail = q_tail = 0)."""
    zs, zt = _robust_inputs("padded", F64, v=10)
    ids, tlp, tail = make_cache(zt, 5)
    assert torch.isneginf(tail).all()
    bad = []
    for _, name, over in ROBUST_CFGS:
        c = LossConfig.preset(name, **over)
        z = zs.clone().requires_grad_(True)
        out = sparse_loss(z, ids, tlp, tail, c)
        full = full_loss(zs, zt, c)
        if not torch.isfinite(out).all():
            bad.append(f"{name}{over}: loss {out.tolist()}")
            continue
        if not torch.allclose(out, full, rtol=1e-9, atol=1e-12):
            bad.append(f"{name}{over}: sparse {out.tolist()} full {full.tolist()}")
        if out.requires_grad:
            (g,) = torch.autograd.grad(out.sum(), z, allow_unused=True)
            if g is not None and not torch.isfinite(g).all():
                bad.append(f"{name}{over}: non-finite grad")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("entry", ["full", "sparse"])
def test_bf16_logits_computed_in_float32(entry):
    zs, zt = random_case(71, 4, 16)
    zs16, zt16 = zs.bfloat16(), zt.bfloat16()
    ids, tlp, tail = make_cache(zt16.double(), 4)
    tlp32, tail32 = tlp.float(), tail.float()
    for _, name, over in ROBUST_CFGS:
        c = LossConfig.preset(name, **over)
        z = zs16.clone().requires_grad_(True)
        if entry == "full":
            out = full_loss(z, zt16, c)
            kw = {f: getattr(c, f) for f in ("alpha", "lam", "divergence", "order", "ab_alpha", "ab_beta", "jsd_beta")}
            want = ref_full(zs16.double(), zt16.double(), kw)
        else:
            out = sparse_loss(z, ids, tlp32, tail32, c)
            kw = {f: getattr(c, f) for f in ("alpha", "lam", "divergence", "order", "ab_alpha", "ab_beta", "jsd_beta", "tail")}
            want = ref_sparse(zs16.double(), ids, tlp32.double(), tail32.double(), kw)
        assert out.dtype == torch.float32, (name, out.dtype)
        torch.testing.assert_close(out.double(), want, rtol=2e-4, atol=1e-5)
        (g,) = torch.autograd.grad(out.sum(), z)
        assert torch.isfinite(g.float()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.99, 0.999])
def test_infinite_loss_when_r_underflows(dtype, alpha):
    """α just below 1: r > 0 where p = 0 but exp(log r) underflows; KL(r‖p) is +inf, never NaN."""
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=F64)).to(dtype)
    lq = torch.log(torch.tensor([[0.4, 0.4, 0.2]], dtype=F64)).to(dtype)
    for lam in (0.5, 0.9):
        rp = full_loss(lq, lp, cfg(alpha=alpha, lam=lam, divergence="kl", order="rp"))
        rq = full_loss(lp, lq, cfg(alpha=alpha, lam=lam, divergence="kl", order="rq"))  # roles swapped
        assert torch.isposinf(rp).all() and torch.isposinf(rq).all(), (lam, rp, rq)


@pytest.mark.parametrize("alpha", [-50.0, -10.0, -3.0, 3.0, 10.0, 50.0])
def test_mixture_extreme_lambda_accuracy(alpha):
    """λ within [0, 1] but very close to an endpoint: no NaN, float64 accuracy kept.

    (The reference's log-space logaddexp form was checked against 60-digit mpmath to 1e-16.)"""
    zs, zt = random_case(49, 6, 12)
    lp, lq = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
    errs = []
    for lam in (1e-300, 1e-20, 1e-12, 1e-8, 1 - 1e-8, 1 - 1e-12):
        got = log_alpha_mixture(lp, lq, alpha, lam).exp()
        want = ref_log_mixture(lp, lq, alpha, lam).exp()
        rel = ((got - want).abs() / want).max().item()
        if not rel <= 1e-9:
            errs.append(f"α={alpha} λ={lam!r}: max rel err {rel:.2e}")
    assert not errs, "\n".join(errs)


@pytest.mark.parametrize("alpha", [1 - 1e-7, 1 - 1e-5, 1 + 1e-6])
@pytest.mark.parametrize("lam", [1e-8, 1e-7, 1 - 1e-7])
def test_mixture_float32_keeps_tiny_weights_near_alpha_one(alpha, lam):
    # Near α = 1 the log1p term is divided by a tiny c: a weight λ that float32 would lose in
    # 1 − (1 − λ) must come through exactly (teachers with exact zeros make it visible).
    zs, zt = zipf_zero_case(50)
    lp64, lq64 = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
    want = ref_log_mixture(lp64, lq64, alpha, lam).exp()
    got = log_alpha_mixture(lp64.float(), lq64.float(), alpha, lam).exp().double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha", [-1e38, -1e31, -1.9e30, 1e31, 1.9e30, 1e38])
def test_mixture_beyond_float_range_of_c_is_the_max_min_limit(alpha):
    # |c| just under the 1e30 switch (α = ±1.9e30) still runs the formula: it must agree with the
    # limit (no overflow below the switch); above it, the limit itself.
    zs, zt = random_case(51, 4, 9)
    lp, lq = torch.log_softmax(zt, -1).float(), torch.log_softmax(zs, -1).float().requires_grad_()
    r = log_alpha_mixture(lp, lq, alpha, 0.3)
    limit = log_alpha_mixture(lp, lq.detach(), NINF if alpha < 0 else INF, 0.3)
    torch.testing.assert_close(r.detach(), limit)
    r.exp().pow(2).sum().backward()
    assert torch.isfinite(lq.grad).all()


def test_repeated_top_k_ids_are_refused():
    from amid.fused import fused_sparse_loss

    ids = torch.tensor([[1, 2, 3], [2, 7, 2]])
    lps, tail = torch.full((2, 3), -2.0), torch.full((2,), -1.0)
    with pytest.raises(ValueError, match="topk_ids row 1 names an id twice"):
        sparse_loss(torch.randn(2, 10), ids, lps, tail, LossConfig.preset("kd"))
    with pytest.raises(ValueError, match="topk_ids row 1 names an id twice"):
        fused_sparse_loss(torch.randn(2, 4), torch.randn(10, 4), None, ids, lps, tail, LossConfig.preset("kd"))
    one, rest = torch.full((2, 1), math.log(0.3)), torch.full((2,), math.log(0.7))
    assert torch.isfinite(sparse_loss(torch.randn(2, 10), ids[:, :1], one, rest, LossConfig.preset("kd"))).all()


def test_targets_that_are_not_log_probabilities_are_refused():
    from amid.fused import fused_sparse_loss
    from amid.teacher import teacher_topk

    gen = torch.Generator().manual_seed(5)
    teacher = torch.randn(3, 50, generator=gen) * 2
    ids, lps, tail = teacher_topk(teacher, 8)
    kd = LossConfig.preset("kd")
    student, hidden, weight = torch.randn(3, 50), torch.randn(3, 4), torch.randn(50, 4)
    assert torch.isfinite(sparse_loss(student, ids, lps, tail, kd)).all()
    logits = teacher.gather(1, ids)  # the slip: top-k logits in place of log-probabilities
    for bad_top, bad_tail, mass in ((logits, tail, "mass of [0-9.]+, not 1"),
                                    (lps, torch.zeros(3), "mass of 1.[0-9]+, not 1"),
                                    (lps, tail.clone().fill_(math.nan), "mass of nan, not 1")):
        with pytest.raises(ValueError, match=f"row 0's teacher bins hold a {mass}: topk_logprobs must be log-prob"):
            sparse_loss(student, ids, bad_top, bad_tail, kd)
        with pytest.raises(ValueError, match="row 0's teacher bins"):
            fused_sparse_loss(hidden, weight, None, ids, bad_top, bad_tail, kd)
    sparse_loss(student, ids, logits, tail, kd, check_ids=False)  # the trainer's cache targets: unchecked


def test_cache_rounding_of_teacher_bins_stays_inside_the_tolerance():
    from amid.codec import round_logprobs
    from amid.losses import BINS_MASS_TOLERANCE, check_teacher_bins
    from amid.teacher import teacher_topk

    gen = torch.Generator().manual_seed(6)
    worst = 0.0
    for scale in (0.1, 1.0, 3.0, 10.0):  # flat to peaked teachers
        _, lps, tail = teacher_topk(torch.randn(2000, 5000, generator=gen) * scale, 64)
        stored = torch.from_numpy(round_logprobs(lps.numpy()).astype(np.float32))
        check_teacher_bins(stored, tail)
        mass = torch.logsumexp(torch.cat([stored.double(), tail.double()[:, None]], 1), 1).exp()
        worst = max(worst, (mass - 1).abs().max().item())
    assert 1e-4 < worst < BINS_MASS_TOLERANCE / 5, worst  # rounding moves the mass; well inside the bound

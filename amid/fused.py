"""The sparse AMiD loss fused with the LM head: never holds the [N, V] logits (issue 6).

`fused_sparse_loss(hidden, lm_weight, lm_bias, topk_ids, topk_logprobs, tail_logmass, config)`
equals `sparse_loss(hidden @ lm_weight.T + lm_bias, ...)` per position, with gradients for the
hidden states, the weight and the bias. Only the student side touches the vocabulary: log q(S),
log q_tail and the α-β tail weight log γ (SPEC §4). The divergence and the α-mixture are then
plain autograd on [N, k + 1] (`amid.losses.bins_loss`, shared with `sparse_loss`), so every
preset, order and tail mode works unchanged.

Two strategies, both exact (same arithmetic as the materialised path):

- ``"recompute"`` (default for bf16/fp16): a custom autograd function returns the k + 1 bins.
  Its forward walks row chunks of the logits (one matmul per chunk, row statistics kept, logits
  dropped); its backward walks vocabulary blocks of equal width, recomputes each block of logits
  for all rows, writes their gradient and feeds it to two matmuls: grad W[block] in one GEMM
  over all N (no rounding across chunks), grad h accumulated in float32. Four matmuls of N·V·H.
- ``"forward"`` (default for float32/float64, where matmuls dominate): the gradient is computed
  during the forward pass, chunk by chunk (the loss of a row depends on that row only), so the
  logits are computed once: three matmuls. The backward scales the stored gradients by the
  upstream gradient when it is the same for every position (a mean or a sum; the trainer's
  case; one host sync to check); otherwise it recomputes the weight gradient with the
  per-position weights.

Peak memory is the inputs, the gradients and one chunk of logits (``chunk_size`` rows, or
vocabulary blocks of the same number of elements), not N × V. Larger chunks trade memory for
speed (fewer, larger matmuls); see benchmarks/RESULTS.md.

On CUDA the elementwise work runs as torch.compile'd kernels (plain PyTorch functions below):
the tail statistics of a chunk in one fused reduction, the logit gradient of a block in one
fused pointwise pass, the chain rule to the bins in one kernel, and the (k + 1)-bin objective
itself (forward and backward; `amid.losses.bins_loss` calls `compiled_objective`) instead of
~200 small launches. The top-k membership test inside a kernel reads a bit mask of S (one bit
per vocabulary entry). Elsewhere the same steps run as chunked eager PyTorch. ``AMID_COMPILE=0``
disables the compiled path, ``AMID_COMPILE=1`` forces it (CPU too, through Inductor's C++
backend). `amid.bins.student_bins` (the materialised path) uses the same kernels. A compile
failure warns once and falls back to the eager code.
"""

from __future__ import annotations

import math
import os
import types
import warnings

import torch
from torch import Tensor

from amid.bins import (
    BinGrads,
    RowStats,
    bin_grads,
    check_distinct,
    compute_dtype,
    eager_dense_grad,
    eager_logit_stats,
    finish_stats,
    row_shift,
)
from amid.errors import OUT_OF_MEMORY
from amid.losses import LossConfig, bins_loss, check_teacher_bins, tail_weight_degree

__all__ = ["fused_sparse_loss", "compiled_kernels_enabled", "logit_stats", "logit_grad"]

MODES = ("auto", "recompute", "forward")

# Elements of one chunk of logits (rows × V in the forward, N × columns in the backward).
_CHUNK_ELEMENTS = 1 << 25  # compiled kernels: 64 MiB of bf16 logits, no float32 temporaries
# Eager (the CPU): 256 MiB of float32 logits per matmul (amid.bins cuts the elementwise work into
# cache-sized pieces itself). The "forward" strategy adds each chunk's [V, H] weight gradient into
# one accumulator, a pass over V × H per chunk: at 2^23 (55 rows at V = 151936) that pass made the
# fused loss 1.55x the materialised one at N = 2048; at 2^26 (441 rows) 0.98x (RESULTS.md).
_CHUNK_ELEMENTS_EAGER = 1 << 26


# ----------------------------------------------------------------------------------------------
# Compiled kernels: plain PyTorch functions that torch.compile turns into a few fused kernels.
# Each (function, dtype, width, s, ...) gets its own copy of the function's code object, so its
# own compile cache: no recompile-limit fallbacks, no shape guessing. The row dimension is
# marked dynamic (batches vary); the vocabulary width is static (it is fixed per model), which
# keeps the generated loads vectorised.

_compile_state: dict[object, object] = {"failed": False}


def compiled_kernels_enabled(t: Tensor) -> bool:
    """Whether the torch.compile'd student-side kernels serve tensors like `t`."""
    setting = os.environ.get("AMID_COMPILE", "auto").strip().lower()
    if setting in ("0", "off", "false", "no") or _compile_state["failed"]:
        return False
    if setting in ("1", "on", "true", "yes"):
        return True
    if not t.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class _CompileFailed(RuntimeError):
    pass


def _keyed_compile(fn, key):
    compiled = _compile_state.get(key)
    if compiled is None:
        tag = f"{fn.__name__}__amid{len(_compile_state)}"
        clone = types.FunctionType(
            fn.__code__.replace(co_name=tag), fn.__globals__, tag, fn.__defaults__, fn.__closure__
        )
        compiled = torch.compile(clone, dynamic=None)
        _compile_state[key] = compiled
    return compiled


def _run_compiled(fn, key, *args):
    for a in args:
        if isinstance(a, Tensor) and a.dim() >= 1:
            torch._dynamo.maybe_mark_dynamic(a, 0)
    try:
        return _keyed_compile(fn, key)(*args)
    except OUT_OF_MEMORY:
        raise  # the caller's problem, not the compiler's: do not switch the kernels off
    except Exception as err:  # a missing compiler or an Inductor bug must not stop training
        _compile_state["failed"] = True
        warnings.warn(f"amid: torch.compile of the loss kernels failed ({err!r}); using eager code")
        raise _CompileFailed from err


def _bits(cols: Tensor, n_cols: int, valid: Tensor | None = None) -> Tensor:
    """[R, ceil(n_cols / 32)] int32 bit mask of the columns `cols` ([R, k], distinct per row,
    in [0, n_cols)); entries where `valid` is False are left out."""
    val = torch.ones_like(cols) << (cols & 31)
    val = torch.where(val >= 2**31, val - 2**32, val)  # bit 31 as int32's sign bit
    if valid is not None:
        val = torch.where(valid, val, 0)
    bits = torch.zeros(cols.shape[0], (n_cols + 31) // 32, dtype=torch.int32, device=cols.device)
    return bits.scatter_add(1, cols >> 5, val.to(torch.int32))  # distinct bits: sum == or


def _in_s(bits: Tensor, n_cols: int) -> Tensor:
    # Bit j of row i's mask: is column j one of row i's top-k ids.
    j = torch.arange(n_cols, device=bits.device, dtype=torch.int32)
    return ((bits[:, j >> 5] >> (j & 31)) & 1) != 0


def _k_stats(lg: Tensor, ids: Tensor, s: float | None, cdtype: torch.dtype):
    """`amid.bins.RowStats` (as a plain tuple) of one chunk of logits [R, V]."""
    n_cols = lg.shape[1]
    z_s = lg.gather(1, ids).to(cdtype)
    z = lg.to(cdtype)
    tail = torch.where(_in_s(_bits(ids, n_cols), n_cols), -math.inf, z)
    m = row_shift(tail.amax(dim=1), z_s)
    e = tail - m[:, None]  # ≤ 0, −inf off the tail
    lse_tail = torch.log(torch.exp(e).sum(dim=1))
    if s is None:
        lse_s_tail = torch.zeros_like(m)
    elif s > 0:  # the tail's max of s·e is 0: no second max pass, one loop for both sums
        lse_s_tail = torch.log(torch.exp(e * s).sum(dim=1))
    else:
        es = torch.where(torch.isneginf(e), -math.inf, e * s)
        ms = es.amax(dim=1)
        ms = torch.where(torch.isfinite(ms), ms, 0.0)
        lse_s_tail = torch.log(torch.exp(es - ms[:, None]).sum(dim=1)) + ms
    return tuple(finish_stats(z_s, m, lse_tail, lse_s_tail, s))


def _k_grad(lg, cols, coef, shift, lse_tail, gs, lse_s_tail, g_top, s: float | None, cdtype: torch.dtype):
    """dL/dlogits of one block of logits [R, width] whose column 0 is vocabulary entry v0;
    cols = topk_ids − v0 (ids outside [0, width) belong to other blocks)."""
    width = lg.shape[1]
    valid = (cols >= 0) & (cols < width)
    colc = cols.clamp(0, width - 1)
    e = lg.to(cdtype) - shift[:, None]
    g = coef[:, None] * torch.exp(e - lse_tail[:, None])
    if s is not None:
        es = torch.where(torch.isneginf(e), -math.inf, e * s)
        g = g + gs[:, None] * torch.exp(es - lse_s_tail[:, None])
    g = torch.where(_in_s(_bits(colc, width, valid), width), 0.0, g).to(lg.dtype)
    # S entries are exactly 0 in g; out-of-block ids add 0 to a clamped column.
    return g.scatter_add(1, colc, torch.where(valid, g_top, 0.0).to(lg.dtype))


def _stats_c(lg: Tensor, ids: Tensor, s: float | None, cdtype: torch.dtype) -> RowStats:
    key = ("stats", lg.dtype, lg.shape[1], s, lg.device.type)
    return RowStats(*_run_compiled(_k_stats, key, lg, ids, s, cdtype))


def _grad_c(lg: Tensor, cols: Tensor, bg: BinGrads, s: float | None, cdtype: torch.dtype) -> Tensor:
    key = ("grad", lg.dtype, lg.shape[1], s, lg.device.type)
    return _run_compiled(
        _k_grad, key, lg, cols, bg.coef, bg.shift, bg.lse_tail, bg.gs, bg.lse_s_tail, bg.g_top, s, cdtype
    )


def compiled_bin_grads(g_s, g_tail, g_gamma, shift, lse_tail, lse_s_tail, log_q_s, log_q_tail, s) -> BinGrads:
    """`amid.bins.bin_grads`, compiled where the kernels are (a dozen small ops → one)."""
    args = (g_s, g_tail, g_gamma, shift, lse_tail, lse_s_tail, log_q_s, log_q_tail, s)
    if compiled_kernels_enabled(log_q_s):
        key = ("bin_grads", log_q_s.dtype, s, log_q_s.device.type)
        try:
            return BinGrads(*_run_compiled(bin_grads, key, *args))
        except _CompileFailed:
            pass
    return bin_grads(*args)


def logit_stats(logits: Tensor, ids: Tensor, s: float | None, cdtype: torch.dtype) -> RowStats:
    """`amid.bins.RowStats` from full logits [N, V], compiled (callers check
    `compiled_kernels_enabled` and fall back to eager code on `_CompileFailed`)."""
    return _stats_c(logits, ids, s, cdtype)


def logit_grad(logits: Tensor, ids: Tensor, bg: BinGrads, s: float | None, cdtype: torch.dtype) -> Tensor:
    """dL/dlogits [N, V] in the logits' dtype, compiled."""
    return _grad_c(logits, ids, bg, s, cdtype)


def compiled_objective(eager, log_q_s, log_q_tail, log_gamma, topk_logprobs, tail_logmass, config):
    """`eager(log_q_s, ..., config)` (`bins_loss`'s eager body) through torch.compile (forward and
    backward each a few fused kernels instead of ~200 small launches), or None where that is off.
    Configurations with a λ schedule stay eager: their λ changes every step and would recompile."""
    if config.lam_end is not None or not compiled_kernels_enabled(log_q_s):
        return None
    key = ("objective", config, log_q_s.dtype, log_q_s.device.type)
    fn = _compile_state.get(("objective-fn", config))
    if fn is None:
        fn = _objective_for(eager, config)
        _compile_state[("objective-fn", config)] = fn
    try:
        return _run_compiled(fn, key, log_q_s, log_q_tail, log_gamma, topk_logprobs, tail_logmass)
    except _CompileFailed:
        return None


def _objective_for(eager, config: LossConfig):
    def objective(log_q_s, log_q_tail, log_gamma, topk_logprobs, tail_logmass):
        return eager(log_q_s, log_q_tail, log_gamma, topk_logprobs, tail_logmass, config)

    return objective


# ----------------------------------------------------------------------------------------------
# Chunked passes over the LM head.


def _logits(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t())


def _chunk_rows(n: int, v: int, chunk_size: int | None, fast: bool, mode: str) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    budget = _CHUNK_ELEMENTS if fast else _CHUNK_ELEMENTS_EAGER
    return max(1, min(n, budget // max(v, 1)))


def _block_cols(n: int, v: int, rows: int) -> int:
    # Backward vocabulary blocks hold as many elements as a forward row chunk.
    cols = max(1, (rows * v) // max(n, 1))
    if cols >= 256:
        cols -= cols % 128  # aligned blocks keep the matmuls on their fast paths
    return min(cols, v)


def _row_stats(lg: Tensor, ids: Tensor, s: float | None, cdtype: torch.dtype, fast: bool) -> tuple[RowStats, bool]:
    """(`RowStats`, compiled) for one row chunk of logits `lg` (left as it is). `compiled` says
    which path `_row_grad` takes."""
    if fast:
        try:
            return _stats_c(lg, ids, s, cdtype), True
        except _CompileFailed:
            pass
    return eager_logit_stats(lg, ids, s, cdtype), False


def _row_grad(lg: Tensor, compiled: bool, ids: Tensor, bg: BinGrads, s, cdtype) -> Tensor:
    """dL/dlogits for one row chunk of logits `lg` (overwritten), in the logits' dtype."""
    if compiled:
        try:
            return _grad_c(lg, ids, bg, s, cdtype)
        except _CompileFailed:
            pass
    g = eager_dense_grad(lg, bg, s, cdtype, out=lg)
    return g.scatter_(1, ids, bg.g_top.to(g.dtype))


def _block_grad(lg: Tensor, v0: int, ids: Tensor, bg: BinGrads, s, cdtype, fast: bool) -> Tensor:
    """dL/dlogits for the vocabulary block [v0, v0 + width) of every row (`lg` overwritten)."""
    cols = ids - v0
    if fast:
        try:
            return _grad_c(lg, cols, bg, s, cdtype)
        except _CompileFailed:
            pass
    width = lg.shape[1]
    valid = (cols >= 0) & (cols < width)
    g = eager_dense_grad(lg, bg, s, cdtype, out=lg)
    r = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    g[r[valid], cols[valid]] = bg.g_top[valid].to(g.dtype)
    return g


def _forward_stats(hidden, weight, bias, ids, s, cdtype, rows_per_chunk, fast) -> RowStats:
    n = hidden.shape[0]
    parts = []
    for r0 in range(0, n, rows_per_chunk) or [0]:  # N = 0: one empty chunk, empty outputs
        rows = slice(r0, min(n, r0 + rows_per_chunk))
        lg = _logits(hidden[rows], weight, bias)
        parts.append(_row_stats(lg, ids[rows], s, cdtype, fast)[0])
        del lg
    if len(parts) == 1:
        return parts[0]
    return RowStats(*(torch.cat(p) for p in zip(*parts)))


def _block_starts(v: int, cols: int) -> list[int]:
    # Equal-width blocks (one compiled shape); the last one is shifted left to end at V and
    # overlaps its neighbour: only its new columns are used.
    starts = list(range(0, v - cols + 1, cols))
    if starts[-1] + cols < v:
        starts.append(v - cols)
    return starts


def _backward_blocks(hidden, weight, bias, ids, bg, s, cdtype, cols_per_block, fast, needs):
    """(grad hidden, grad weight, grad bias) from the factored logit gradient, by vocabulary
    blocks: each block's logits are recomputed for all rows."""
    need_h, need_w, need_b = needs
    v = weight.shape[0]
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    gh = torch.zeros(hidden.shape, dtype=acc_dtype, device=hidden.device) if need_h else None
    gw = torch.empty_like(weight) if need_w else None
    gb = torch.empty_like(bias) if need_b else None
    done = 0
    for v0 in _block_starts(v, cols_per_block):
        v1 = v0 + cols_per_block
        lg = _logits(hidden, weight[v0:v1], None if bias is None else bias[v0:v1])
        g = _block_grad(lg, v0, ids, bg, s, cdtype, fast)
        del lg
        if done > v0:
            g = g[:, done - v0 :]
        w_blk = weight[done:v1]
        if need_w:
            torch.mm(g.t(), hidden, out=gw[done:v1])
        if need_h:
            if g.dtype == acc_dtype:
                gh.addmm_(g, w_blk)
            else:
                gh.add_(torch.mm(g, w_blk))
        if need_b:
            gb[done:v1] = g.sum(dim=0, dtype=acc_dtype)
        done = v1
    return (None if gh is None else gh.to(hidden.dtype)), gw, gb


class _FusedBins(torch.autograd.Function):
    """hidden, W, b → (log q(S), log q_tail, log γ); backward recomputes logits by blocks."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, s, rows_per_chunk, fast, fwd_rows):  # type: ignore[override]
        cdtype = compute_dtype(hidden)
        n, v = hidden.shape[0], weight.shape[0]
        st = _forward_stats(hidden, weight, bias, ids, s, cdtype, fwd_rows, fast)
        ctx.s, ctx.fast, ctx.cdtype = s, fast, cdtype
        ctx.cols = _block_cols(n, v, rows_per_chunk)
        ctx.save_for_backward(hidden, weight, bias, ids, st.shift, st.lse_tail, st.lse_s_tail, st.log_q_s,
                              st.log_q_tail)
        return st.bins()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_s, g_tail, g_gamma):  # type: ignore[override]
        hidden, weight, bias, ids, *stats = ctx.saved_tensors
        bg = compiled_bin_grads(g_s, g_tail, g_gamma, *stats, ctx.s)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        gh, gw, gb = _backward_blocks(hidden, weight, bias, ids, bg, ctx.s, ctx.cdtype, ctx.cols, ctx.fast, needs)
        return gh, gw, gb, None, None, None, None, None


class _FusedLossForwardGrad(torch.autograd.Function):
    """hidden, W, b → per-position loss; the gradient of Σ loss is built during the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, p_s, p_tail, config, s, rows_per_chunk, fast):  # type: ignore[override]
        cdtype = compute_dtype(hidden)
        n, v = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        want_grad = need_h or need_w or need_b
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        loss = torch.empty(n, dtype=cdtype, device=hidden.device)
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        gb = torch.zeros(v, dtype=acc_dtype, device=weight.device) if need_b else None
        parts: list[BinGrads] = []
        for r0 in range(0, n, rows_per_chunk):
            rows = slice(r0, min(n, r0 + rows_per_chunk))
            h = hidden[rows]
            idx = ids[rows]
            lg = _logits(h, weight, bias)
            st, compiled = _row_stats(lg, idx, s, cdtype, fast)
            if not want_grad:
                loss[rows] = bins_loss(*st.bins(), p_s[rows], p_tail[rows], config)
                continue
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in st.bins()]
                chunk_loss = bins_loss(*leaves, p_s[rows], p_tail[rows], config)
                if chunk_loss.requires_grad:
                    grads = torch.autograd.grad(chunk_loss.sum(), leaves, allow_unused=True)
                else:  # e.g. D(p, r) with r built from a detached student: no gradient at all
                    grads = (None, None, None)
            loss[rows] = chunk_loss.detach()
            g_s, g_tail, g_gamma = (torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves))
            bg = compiled_bin_grads(g_s, g_tail, g_gamma, st.shift, st.lse_tail, st.lse_s_tail, st.log_q_s,
                                    st.log_q_tail, s)
            parts.append(bg)
            g = _row_grad(lg, compiled, idx, bg, s, cdtype)
            del lg
            if need_h:
                torch.mm(g, weight, out=gh[rows])
            if need_w:
                if g.dtype == acc_dtype:
                    gw.addmm_(g.t(), h)
                else:  # half inputs: accumulate across chunks in float32
                    gw.add_(torch.mm(g.t(), h))
            if need_b:
                gb.add_(g.sum(dim=0, dtype=acc_dtype))
        if want_grad:
            bg_all = BinGrads(
                *(None if parts[0][i] is None else torch.cat([p[i] for p in parts]) for i in range(len(BinGrads._fields)))
            ) if parts else None
            ctx.bg = bg_all
            ctx.s, ctx.fast, ctx.cdtype = s, fast, cdtype
            ctx.cols = _block_cols(n, v, rows_per_chunk)
            ctx.grads = (
                gh,
                None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(bias.dtype),
            )
            ctx.save_for_backward(hidden, weight, bias, ids)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):  # type: ignore[override]
        if ctx.grads is None:  # freed by the first backward: they are as large as the inputs
            raise RuntimeError("fused_sparse_loss(mode='forward') supports one backward per forward; "
                               "use mode='recompute' to call backward again (retain_graph)")
        gh, gw, gb = ctx.grads
        ctx.grads = None
        n = go.shape[0]
        if n == 0:
            return gh, gw, gb, *([None] * 7)
        first = go[:1]
        if bool((go == first).all()):  # one sync: a mean or a sum over positions
            scale = first[0]
            gh = None if gh is None else gh.mul_(scale.to(gh.dtype))
            gw = None if gw is None else gw.mul_(scale.to(gw.dtype))
            gb = None if gb is None else gb.mul_(scale.to(gb.dtype))
            return gh, gw, gb, *([None] * 7)
        # Per-position weights: grad h scales row by row; W and b need the logits again.
        hidden, weight, bias, ids = ctx.saved_tensors
        w = go.to(ctx.cdtype)
        if gh is not None:
            gh = (gh.to(ctx.cdtype) * w[:, None]).to(hidden.dtype)
        if gw is not None or gb is not None:
            needs = (False, gw is not None, gb is not None)
            _, gw, gb = _backward_blocks(hidden, weight, bias, ids, ctx.bg.scaled(w), ctx.s, ctx.cdtype, ctx.cols, ctx.fast, needs)
        return gh, gw, gb, *([None] * 7)


def fused_sparse_loss(
    hidden: Tensor,
    lm_weight: Tensor,
    lm_bias: Tensor | None,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    config: LossConfig,
    chunk_size: int | None = None,
    mode: str = "auto",
    check_ids: bool = True,
) -> Tensor:
    """`sparse_loss(hidden @ lm_weight.T + lm_bias, topk_ids, topk_logprobs, tail_logmass, config)`
    without the [N, V] logits.

    Args:
        hidden: [N, H] the student's last hidden states (after the final norm) at the target
            positions; gradients flow into it.
        lm_weight: [V, H] the LM head (tied embeddings work: pass the embedding matrix).
        lm_bias: [V] or None.
        topk_ids, topk_logprobs, tail_logmass: the cache's targets, as for `sparse_loss`.
        config: the objective.
        chunk_size: token rows per chunk of logits (default: about 32M logits per chunk with
            the compiled kernels, 64M in eager mode; the compiled "recompute" forward takes 4× as
            many rows); the backward's vocabulary blocks hold as many logits as a chunk.
        mode: "auto", "recompute" or "forward" (see the module docstring). "auto" picks
            "forward" for float32/float64 and "recompute" for bf16/fp16.
        check_ids: as for `sparse_loss` (refuse repeated ids and targets that are not
            log-probabilities; the trainer passes False).

    Returns:
        [N] loss in float32 (float64 for float64 inputs).
    """
    n, k = topk_ids.shape
    if hidden.dim() != 2 or hidden.shape[0] != n:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match topk_ids {tuple(topk_ids.shape)}")
    if lm_weight.dim() != 2 or lm_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"lm_weight {tuple(lm_weight.shape)} does not match hidden {tuple(hidden.shape)}")
    if lm_bias is not None and lm_bias.shape != (lm_weight.shape[0],):
        raise ValueError(f"lm_bias {tuple(lm_bias.shape)} must be [{lm_weight.shape[0]}]")
    if topk_logprobs.shape != (n, k) or tail_logmass.shape != (n,):
        raise ValueError(
            f"topk_logprobs {tuple(topk_logprobs.shape)} / tail_logmass {tuple(tail_logmass.shape)}"
            f" must be [{n}, {k}] / [{n}]"
        )
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if lm_weight.dtype != hidden.dtype or (lm_bias is not None and lm_bias.dtype != hidden.dtype):
        raise ValueError("hidden, lm_weight and lm_bias must share one dtype")
    if mode == "auto":
        mode = "forward" if hidden.dtype in (torch.float32, torch.float64) else "recompute"
    ids = topk_ids.long()
    if check_ids:
        check_distinct(ids)
        check_teacher_bins(topk_logprobs, tail_logmass)
    s = tail_weight_degree(config)
    v = lm_weight.shape[0]
    fast = compiled_kernels_enabled(hidden)
    rows = _chunk_rows(n, v, chunk_size, fast, mode)
    if mode == "forward":
        if not torch.is_grad_enabled():  # evaluation: no gradient to build during the forward
            hidden, lm_weight = hidden.detach(), lm_weight.detach()
            lm_bias = None if lm_bias is None else lm_bias.detach()
        return _FusedLossForwardGrad.apply(
            hidden, lm_weight, lm_bias, ids, topk_logprobs, tail_logmass, config, s, rows, fast
        )
    # The forward holds one chunk of logits and nothing else of size, the backward a block of
    # logits, its gradient and the weight gradient: the forward's chunks can be 4× larger at no
    # cost in peak memory (and wide reductions need many rows to fill the GPU).
    fwd_rows = rows if chunk_size is not None or not fast else min(n, 4 * rows)
    bins = _FusedBins.apply(hidden, lm_weight, lm_bias, ids, s, rows, fast, fwd_rows)
    return bins_loss(*bins, topk_logprobs, tail_logmass, config)

"""How the cache stores a top-k teacher distribution per target position (pure NumPy, no I/O).

Chosen by measurement (README, "Cache format"): per position, the top-k ids sorted ascending
(stored raw, so any Arrow reader sees real token ids; Parquet's byte-stream split + zstd makes
sorted ids nearly as small as delta coding would), their log-probabilities as IEEE float16
rounded to `LOGPROB_MANTISSA_BITS` mantissa bits (round-to-nearest-even from float32, so the
stored values are unbiased; the dropped low bits are zeros that zstd removes), and the tail
log-mass as exact float32.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LOGPROB_MANTISSA_BITS", "id_dtype", "round_logprobs", "encode_topk"]

LOGPROB_MANTISSA_BITS = 8


def id_dtype(vocab_size: int) -> np.dtype:
    """Narrowest unsigned integer that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def round_logprobs(x: np.ndarray, mantissa_bits: int = LOGPROB_MANTISSA_BITS) -> np.ndarray:
    """float32 → float16 with at most `mantissa_bits` (≤ 10) significant mantissa bits, rounding
    to nearest even once (no double rounding through float16)."""
    if not 1 <= mantissa_bits <= 10:
        raise ValueError(f"mantissa_bits must be in 1..10, got {mantissa_bits}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    drop = 23 - mantissa_bits
    u = x.view(np.uint32)
    finite = np.isfinite(x)
    # Round-to-nearest-even on the magnitude bits; a carry into the exponent is the correct result.
    bias = np.uint32((1 << (drop - 1)) - 1) + ((u >> np.uint32(drop)) & np.uint32(1))
    rounded = ((u + bias) >> np.uint32(drop)) << np.uint32(drop)
    u = np.where(finite, rounded, u)
    with np.errstate(over="ignore"):  # |x| > 65504 becomes ±inf: exp(-65504) is 0 in float32 anyway
        return u.view(np.float32).astype(np.float16)


def encode_topk(topk_ids: np.ndarray, topk_logprobs: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by id and encode: ([P, k] ids in `id_dtype`, [P, k] float16 log-probs)."""
    order = np.argsort(topk_ids, axis=1, kind="stable")
    ids = np.take_along_axis(topk_ids, order, axis=1).astype(id_dtype(vocab_size))
    lps = round_logprobs(np.take_along_axis(topk_logprobs, order, axis=1))
    return ids, lps

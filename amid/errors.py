"""The one line of an exception that a user is shown: one rule for the whole package."""

from __future__ import annotations

import torch  # loaded by `import amid` already

__all__ = ["first_line", "OUT_OF_MEMORY"]

# torch.OutOfMemoryError exists from torch 2.5; before, CUDA's was the only one (amid allows 2.2).
OUT_OF_MEMORY: type[BaseException] = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def first_line(exc: BaseException) -> str:
    """The first non-empty line of `exc`'s message without a trailing colon (transformers ends
    some with one before its details), or the exception's type name. A `datasets`
    DatasetGenerationError ("An error occurred while generating the dataset") gives its cause's."""
    while exc.__cause__ is not None and type(exc).__name__ == "DatasetGenerationError":
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0].rstrip(": ") if lines else type(exc).__name__

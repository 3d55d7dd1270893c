"""When two spellings of a path name the same file: one rule for the whole package."""

from __future__ import annotations

import os

__all__ = ["same_path"]


def same_path(a: str, b: str) -> bool:
    """Equal strings, or two spellings (relative, absolute, through a symlink) of one existing
    file or directory. Paths that do not exist here (hub names, another machine's paths) are
    compared as strings."""
    if a == b:
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False

"""When two spellings of a path name the same file: one rule for the whole package."""

from __future__ import annotations

import os

from typing import Any

__all__ = ["same_path", "same_setting"]


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


def same_setting(a: Any, b: Any) -> bool:
    """Equal settings (dicts and lists compared item by item), where two spellings of one existing
    path (`same_path`) are the same setting: a resumed run or a rerun sweep may name its cache,
    student or output directory another way."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_setting(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_setting(x, y) for x, y in zip(a, b))
    return same_path(a, b) if isinstance(a, str) and isinstance(b, str) else a == b

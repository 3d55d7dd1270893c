"""An exclusive lock on a file in an output directory, held while a job writes there.

A second `amid train` in a run directory that is still training (a `--resume` started too early),
or the same `amid cache-teacher` submitted twice, is refused before it writes anything, instead of
writing beside the first (cache-teacher's start-up removes a killed writer's temporaries, which
would be the running one's). The kernel drops the lock when the process ends, kill -9 included,
so a killed job leaves none behind. A file system without locks (some network ones) is left
unlocked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

__all__ = ["DirLock"]


class DirLock:
    """flock(directory / name) once the directory exists; `busy()` is the exception to raise when
    another process holds it."""

    def __init__(self, directory: Path, name: str, busy: Callable[[], Exception], enabled: bool = True):
        self.directory, self.name, self.busy, self.enabled = Path(directory), name, busy, enabled
        self._fh = None

    def take(self) -> None:
        if not self.enabled or self._fh is not None or not self.directory.is_dir():
            return
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            return
        fh = open(self.directory / self.name, "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise self.busy() from None
        except OSError:  # no locks here
            fh.close()
            return
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

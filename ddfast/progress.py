"""Progress bars and log lines.

Bars (tqdm, with rate and ETA) appear only when asked or when stderr is a terminal, so logs of
batch jobs stay clean; log lines always go to stdout.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm.auto import tqdm


def bars_enabled(setting: str = "auto") -> bool:
    """Resolve run.progress: on, off, or auto (a terminal)."""
    if setting == "on":
        return True
    if setting == "off":
        return False
    return sys.stderr.isatty()


def bar(iterable: Iterable | None = None, *, enabled: bool, desc: str, unit: str = "it",
        total: int | None = None, initial: int = 0):
    """A tqdm bar, or a silent pass-through when disabled."""
    return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial,
                disable=not enabled, dynamic_ncols=True, leave=False)


_QUIET = [False]  # set on every process but one under torchrun


def set_quiet(quiet: bool) -> None:
    """Silence log lines of this process (the ranks other than 0 of a distributed run)."""
    _QUIET[0] = bool(quiet)


def log(message: str) -> None:
    if not _QUIET[0]:
        print(message, flush=True)

"""Progress lines for long steps, on stderr so that stdout stays the command's own output."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def say(msg: str) -> None:
    """One line of progress for the user (suppressed by --quiet)."""
    if not _quiet:
        print(f"hvlab: {msg}", file=sys.stderr, flush=True)


@contextmanager
def step(msg: str) -> Iterator[None]:
    """Announce a long step and report how long it took."""
    say(f"{msg} ...")
    t0 = time.monotonic()
    yield
    say(f"{msg}: done in {time.monotonic() - t0:.1f} s")

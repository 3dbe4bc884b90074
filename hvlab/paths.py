"""Where hvlab keeps its cache and per-run state.

Everything downloaded or built (kernels, initramfs images, the nested runner's L1 kit, QEMU roots) lives
under one cache directory so that CI can keep it between runs: ``$XDG_CACHE_HOME/hvlab`` or
``~/.cache/hvlab``, overridable with ``HVLAB_CACHE``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The root of hvlab's cache (created on demand)."""
    env = os.environ.get("HVLAB_CACHE")
    if env:
        root = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "hvlab"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_subdir(*parts: str) -> Path:
    """A directory below the cache root, created on demand."""
    path = cache_dir().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    """Per-run logs (console, event timeline, pcaps): ``$HVLAB_RUNS`` or ``<cache>/runs``."""
    env = os.environ.get("HVLAB_RUNS")
    path = Path(env) if env else cache_dir() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path

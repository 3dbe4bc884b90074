"""The per-run event timeline: one JSON object per line, in the order events happened.

Every component (VMBus server, devices, switch, vfio-user, guest console) reports what it did through
``timeline.event(kind, **fields)``; a failed run is then explained by reading one file instead of
correlating logs. Events carry a monotonic timestamp (seconds since the timeline was opened) because
wall-clock time can jump while a VM runs; the wall-clock start time is written once in the first line.

Components accept any object with an ``event(kind, **fields)`` method (``TimelineSink``), so tests can
pass a ``MemoryTimeline`` and production code a ``Timeline``; ``None`` means "no timeline".
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import IO, Any, Protocol


class TimelineSink(Protocol):
    """What components need from a timeline."""

    def event(self, kind: str, **fields: Any) -> None: ...


def _default(value: Any) -> Any:
    """JSON fallback: bytes as hex, enums by name, anything else as str (never fail the writer)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    name = getattr(value, "name", None)
    if isinstance(name, str):
        return name
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


class Timeline:
    """A thread-safe JSON-lines writer.

    ``Timeline(path)`` opens (truncates) the file; ``Timeline(stream)`` writes to an open text stream.
    Each line is ``{"t": seconds, "kind": kind, **fields}``; lines are flushed as written so a crash
    leaves a usable file.
    """

    def __init__(self, target: str | Path | IO[str], *, clock: Any = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._t0 = clock()
        if isinstance(target, str | Path):
            self._stream: IO[str] = open(target, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._owns = True
            self.path: Path | None = Path(target)
        else:
            self._stream = target
            self._owns = False
            self.path = None
        self.count = 0
        self.event("timeline.start", wall_clock=time.time())

    def event(self, kind: str, **fields: Any) -> None:
        """Append one event; safe from any thread; never raises for unserialisable field values."""
        with self._lock:  # the clock is read under the lock so the file's times never go backwards
            if self._stream.closed:
                return
            record = {"t": round(self._clock() - self._t0, 6), "kind": kind, **fields}
            line = json.dumps(record, default=_default, separators=(",", ":"))
            self._stream.write(line + "\n")
            self._stream.flush()
            self.count += 1

    def close(self) -> None:
        with self._lock:
            if self._owns and not self._stream.closed:
                self._stream.close()

    def __enter__(self) -> Timeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemoryTimeline:
    """Keeps events in a list (tests, and short runs that attach the timeline to a report)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self.events: list[dict[str, Any]] = []

    def event(self, kind: str, **fields: Any) -> None:
        with self._lock:
            self.events.append({"t": time.monotonic() - self._t0, "kind": kind, **fields})

    def kinds(self) -> list[str]:
        return [e["kind"] for e in self.events]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]


def read_timeline(path: str | Path) -> list[dict[str, Any]]:
    """Load a timeline file written by Timeline (for tests and post-mortem tools)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

"""Classic libpcap files (LINKTYPE_ETHERNET): one per switch port, readable by tshark and scapy.rdpcap.

Classic pcap rather than pcapng because every tool reads it and it needs no block bookkeeping: a 24-byte
global header, then a 16-byte record header before each frame. Each record is flushed as it is written,
so a test can read the file while the switch is still running (a crash leaves a usable file too).
"""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path
from typing import BinaryIO

PCAP_MAGIC_US = 0xA1B2C3D4  # microsecond timestamps
LINKTYPE_ETHERNET = 1
SNAPLEN = 262144

_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")


class PcapWriter:
    """Appends frames to a new pcap file; thread-safe; ``close()`` is idempotent."""

    def __init__(self, path: str | os.PathLike[str], *, snaplen: int = SNAPLEN,
                 linktype: int = LINKTYPE_ETHERNET) -> None:
        self.path = Path(path)
        self.snaplen = snaplen
        self.count = 0
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._f.write(_GLOBAL.pack(PCAP_MAGIC_US, 2, 4, 0, 0, snaplen, linktype))
        self._f.flush()

    def write(self, frame: bytes, ts: float | None = None) -> None:
        """Append one frame (truncated to snaplen) stamped ``ts`` (wall clock, default now)."""
        if ts is None:
            ts = time.time()
        sec = int(ts)
        usec = min(999_999, int((ts - sec) * 1e6))
        data = frame[: self.snaplen]
        with self._lock:
            if self._f is None:
                return
            self._f.write(_RECORD.pack(sec, usec, len(data), len(frame)) + data)
            self._f.flush()
            self.count += 1

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_pcap(path: str | os.PathLike[str]) -> list[tuple[float, bytes]]:
    """[(timestamp, frame)] from a classic pcap (either byte order, µs or ns); tolerates a torn last record,
    which is what a reader sees while the writer is running."""
    blob = Path(path).read_bytes()
    if len(blob) < _GLOBAL.size:
        return []
    magic_le, = struct.unpack_from("<I", blob)
    if magic_le in (0xA1B2C3D4, 0xA1B23C4D):
        endian = "<"
    elif magic_le in (0xD4C3B2A1, 0x4D3CB2A1):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a classic pcap file (magic {magic_le:#x})")
    magic, = struct.unpack_from(endian + "I", blob)
    scale = 1e-9 if magic == 0xA1B23C4D else 1e-6
    rec = struct.Struct(endian + "IIII")
    out: list[tuple[float, bytes]] = []
    off = _GLOBAL.size
    while off + rec.size <= len(blob):
        sec, frac, incl, _orig = rec.unpack_from(blob, off)
        off += rec.size
        if off + incl > len(blob):
            break
        out.append((sec + frac * scale, blob[off: off + incl]))
        off += incl
    return out

"""Port-I/O and MMIO dispatch: exits are routed to the device that claimed the address.

A device is any object with ``io_read(port, size) -> int`` / ``io_write(port, size, value)`` (ports) or
``mmio_read(addr, size) -> int`` / ``mmio_write(addr, size, value)`` (memory).  Unclaimed reads return
all-ones and unclaimed writes are ignored, like an empty ISA/PCI bus (which is what makes PCI config ports
read as "no device"); each is counted so benchmarks and debugging can see stray accesses.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Protocol


class IoDevice(Protocol):
    def io_read(self, port: int, size: int) -> int: ...
    def io_write(self, port: int, size: int, value: int) -> None: ...


class MmioDevice(Protocol):
    def mmio_read(self, addr: int, size: int) -> int: ...
    def mmio_write(self, addr: int, size: int, value: int) -> None: ...


class Bus:
    """Ranges [start, start+length) mapped to devices; lookups by bisection (ranges never overlap)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, object]] = []
        self.unclaimed: Counter[int] = Counter()

    def register(self, start: int, length: int, device: object) -> None:
        i = bisect.bisect_right(self._starts, start)
        if i > 0 and self._entries[i - 1][0] + self._entries[i - 1][1] > start:
            raise ValueError(f"{self.name}: {start:#x}+{length:#x} overlaps an existing device")
        if i < len(self._entries) and start + length > self._entries[i][0]:
            raise ValueError(f"{self.name}: {start:#x}+{length:#x} overlaps an existing device")
        self._starts.insert(i, start)
        self._entries.insert(i, (start, length, device))

    def add(self, device: object) -> None:
        """Register a device over every range in its ``port_ranges`` (the device models' convention)."""
        for r in device.port_ranges:  # type: ignore[attr-defined]
            self.register(r.start, len(r), device)

    def unregister(self, start: int) -> None:
        i = self._starts.index(start)
        del self._starts[i]
        del self._entries[i]

    def device_at(self, addr: int) -> object | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            start, length, device = self._entries[i]
            if addr < start + length:
                return device
        return None


class IoBus(Bus):
    def __init__(self) -> None:
        super().__init__("port I/O")

    def read(self, port: int, size: int) -> int:
        dev = self.device_at(port)
        if dev is None:
            self.unclaimed[port] += 1
            return (1 << (8 * size)) - 1
        return dev.io_read(port, size)  # type: ignore[attr-defined]

    def write(self, port: int, size: int, value: int) -> None:
        dev = self.device_at(port)
        if dev is None:
            self.unclaimed[port] += 1
            return
        dev.io_write(port, size, value & ((1 << (8 * size)) - 1))  # type: ignore[attr-defined]


class MmioBus(Bus):
    def __init__(self) -> None:
        super().__init__("MMIO")

    def read(self, addr: int, size: int) -> int:
        dev = self.device_at(addr)
        if dev is None:
            self.unclaimed[addr] += 1
            return (1 << (8 * size)) - 1
        return dev.mmio_read(addr, size)  # type: ignore[attr-defined]

    def write(self, addr: int, size: int, value: int) -> None:
        dev = self.device_at(addr)
        if dev is None:
            self.unclaimed[addr] += 1
            return
        dev.mmio_write(addr, size, value)  # type: ignore[attr-defined]

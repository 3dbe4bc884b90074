"""Port-I/O device models for the hvlab VMM (pure Python, no KVM).

Every device exposes ``port_ranges`` (the ports it decodes), ``io_read(port, size) -> int`` and
``io_write(port, size, value) -> None``; the VMM dispatches KVM_EXIT_IO to them, for example
through :class:`hvlab.vmm.bus.IoBus`. Ports are absolute; ``size`` is 1, 2 or 4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable


@runtime_checkable
class PortIODevice(Protocol):
    port_ranges: tuple[range, ...]

    def io_read(self, port: int, size: int) -> int: ...

    def io_write(self, port: int, size: int, value: int) -> None: ...


def read_bytes(read_byte: Callable[[int], int], port: int, size: int) -> int:
    """Compose a multi-byte read from single-byte register reads (little endian)."""
    return sum(read_byte(port + i) << (8 * i) for i in range(size))


def write_bytes(write_byte: Callable[[int, int], None], port: int, size: int, value: int) -> None:
    """Split a multi-byte write into single-byte register writes (little endian)."""
    for i in range(size):
        write_byte(port + i, (value >> (8 * i)) & 0xFF)

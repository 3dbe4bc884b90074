"""Guest RAM: memfd-backed, mapped MAP_SHARED, addressable by guest-physical address.

A memfd (not anonymous memory) so that device processes, such as vfio-user VF servers, can map the very
same pages (DMA_MAP passes the fd) and the guest's rings are shared without copies.
"""

from __future__ import annotations

import ctypes as C
import mmap
import os
from dataclasses import dataclass


@dataclass
class RamRegion:
    """One contiguous run of guest RAM: ``size`` bytes at ``gpa``, at ``offset`` in the memfd."""

    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """All guest RAM as one memfd, laid out as several GPA regions (e.g. below and above the MMIO hole)."""

    def __init__(self, regions: list[tuple[int, int]], name: str = "hvlab-guest-ram") -> None:
        self.regions: list[RamRegion] = []
        offset = 0
        for gpa, size in regions:
            self.regions.append(RamRegion(gpa, size, offset))
            offset += size
        self.size = offset
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.mmap = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.mmap)
        self.host_addr = C.addressof(C.c_char.from_buffer(self.mmap))

    def _locate(self, gpa: int, length: int) -> int:
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r.offset + (gpa - r.gpa)
        raise ValueError(f"guest-physical range {gpa:#x}+{length:#x} is not RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        """Whether [gpa, gpa+length) lies inside one RAM region (guest-supplied addresses are untrusted)."""
        return any(r.gpa <= gpa and gpa + length <= r.end for r in self.regions)

    def view_at(self, gpa: int, length: int) -> memoryview:
        """A zero-copy window on guest RAM; raises ValueError if the range is not entirely RAM."""
        off = self._locate(gpa, length)
        return self.view[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view_at(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view_at(gpa, len(data))[:] = data

    def host_address(self, region: RamRegion) -> int:
        return self.host_addr + region.offset

    def close(self) -> None:
        try:
            self.view.release()
            self.mmap.close()
        except BufferError:  # a view is still exported; the mapping goes when the process does
            pass
        os.close(self.fd)

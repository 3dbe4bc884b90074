"""PCI configuration space for emulated functions: a byte image plus per-bit write rules.

Why a write-mask model: every register behaviour a driver relies on (BAR sizing by writing all-ones,
read-only IDs, write-1-to-clear status bits, MSI/MSI-X enables) falls out of "which bits are writable,
which clear on writing 1", so one generic write routine gets them all right and the device model only
hears about the changes that matter to it (MSI/MSI-X enable, command register).

Numbers are from the PCI Local Bus 3.0 and PCI Express Base specifications.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("hvlab.vfio_user")

# Standard header offsets
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

CMD_IO = 1 << 0
CMD_MEMORY = 1 << 1
CMD_MASTER = 1 << 2
CMD_PARITY = 1 << 6
CMD_SERR = 1 << 8
CMD_INTX_DISABLE = 1 << 10
CMD_WRITABLE = CMD_IO | CMD_MEMORY | CMD_MASTER | CMD_PARITY | CMD_SERR | CMD_INTX_DISABLE

STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
STATUS_W1C = 0xF900  # parity, target/master aborts, SERR, detected parity error

CAP_ID_PM = 0x01
CAP_ID_MSI = 0x05
CAP_ID_EXP = 0x10
CAP_ID_MSIX = 0x11

MSI_FLAGS_ENABLE = 1 << 0
MSI_FLAGS_64BIT = 1 << 7
MSI_FLAGS_MASKBIT = 1 << 8

MSIX_FLAGS_QSIZE = 0x07FF
MSIX_FLAGS_MASKALL = 1 << 14
MSIX_FLAGS_ENABLE = 1 << 15
MSIX_ENTRY_SIZE = 16
MSIX_ENTRY_CTRL_MASKBIT = 1

CONFIG_SPACE_SIZE = 256
CONFIG_SPACE_EXP_SIZE = 4096


class BarKind(enum.Enum):
    """How a BAR decodes: 32-bit memory, 64-bit memory (takes two BAR slots) or I/O ports."""

    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"


@dataclass(frozen=True)
class Bar:
    """A base address register the device implements. ``size`` is a power of two."""

    size: int
    kind: BarKind = BarKind.MEM32
    prefetchable: bool = False

    def type_bits(self) -> int:
        """The read-only low bits of the BAR (space, type, prefetchable)."""
        if self.kind is BarKind.IO:
            return 0x1
        bits = 0x4 if self.kind is BarKind.MEM64 else 0x0
        return bits | (0x8 if self.prefetchable else 0)


@dataclass(frozen=True)
class MsiCap:
    """MSI capability: ``vectors`` (1..32, a power of two), 64-bit address and per-vector masking."""

    vectors: int = 1
    addr64: bool = True
    per_vector_mask: bool = True


@dataclass(frozen=True)
class MsixCap:
    """MSI-X capability: vector count and where table and PBA live (BAR index and offset)."""

    vectors: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    @property
    def table_size(self) -> int:
        return self.vectors * MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return ((self.vectors + 63) // 64) * 8


@dataclass(frozen=True)
class PcieCap:
    """PCI Express capability (version 2). ``port_type`` 0 is a PCIe endpoint; 1 a legacy endpoint."""

    port_type: int = 0


def _check_pow2(value: int, what: str) -> None:
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{what} must be a power of two, got {value:#x}")


class PciConfigSpace:
    """Configuration space image with write semantics; hooks tell the device about changes.

    ``on_msi_change(enabled, nvec)``, ``on_msix_change(enabled, function_masked)`` and
    ``on_command_change(old, new)`` are called after a write changed the respective register.
    """

    def __init__(
        self,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        bars: dict[int, Bar] | None = None,
        msi: MsiCap | None = None,
        msix: MsixCap | None = None,
        pcie: PcieCap | None = None,
        interrupt_pin: int = 1,
    ) -> None:
        self.size = CONFIG_SPACE_EXP_SIZE if pcie else CONFIG_SPACE_SIZE
        self.data = bytearray(self.size)
        self.wmask = bytearray(self.size)
        self.w1cmask = bytearray(self.size)
        self.bars: list[Bar | None] = [None] * 6
        self._upper_of: set[int] = set()  # BAR slots that hold the upper half of a 64-bit BAR
        self.msi = msi
        self.msix = msix
        self.pcie = pcie
        self.msi_offset = 0
        self.msix_offset = 0
        self.pcie_offset = 0
        self.on_msi_change: Callable[[bool, int], None] | None = None
        self.on_msix_change: Callable[[bool, bool], None] | None = None
        self.on_command_change: Callable[[int, int], None] | None = None

        self._set16(VENDOR_ID, vendor_id)
        self._set16(DEVICE_ID, device_id)
        self.data[REVISION_ID] = revision & 0xFF
        self.data[CLASS_PROG : CLASS_PROG + 3] = (class_code & 0xFFFFFF).to_bytes(3, "little")
        self.data[HEADER_TYPE] = 0x00
        self._set16(SUBSYSTEM_VENDOR_ID, subsystem_vendor_id)
        self._set16(SUBSYSTEM_ID, subsystem_id)
        self.data[INTERRUPT_PIN] = interrupt_pin
        self._mask16(COMMAND, CMD_WRITABLE)
        self._w1c16(STATUS, STATUS_W1C)
        self.wmask[CACHE_LINE_SIZE] = 0xFF
        self.wmask[LATENCY_TIMER] = 0xFF
        self.wmask[INTERRUPT_LINE] = 0xFF
        # ROM_ADDRESS stays all-zero and read-only: no expansion ROM, reads 0, writes ignored.

        for index, bar in sorted((bars or {}).items()):
            self._add_bar(index, bar)

        self._next_cap = 0x40
        self._last_cap_next = CAPABILITY_LIST
        if pcie:
            self.pcie_offset = self._add_pcie(pcie)
        if msi:
            self.msi_offset = self._add_msi(msi)
        if msix:
            self.msix_offset = self._add_msix(msix)
        self._reset_image = bytes(self.data)

    # ------------------------------------------------------------------ image helpers
    def _set16(self, off: int, v: int) -> None:
        self.data[off : off + 2] = (v & 0xFFFF).to_bytes(2, "little")

    def _set32(self, off: int, v: int) -> None:
        self.data[off : off + 4] = (v & 0xFFFFFFFF).to_bytes(4, "little")

    def _mask16(self, off: int, v: int) -> None:
        self.wmask[off : off + 2] = v.to_bytes(2, "little")

    def _mask32(self, off: int, v: int) -> None:
        self.wmask[off : off + 4] = (v & 0xFFFFFFFF).to_bytes(4, "little")

    def _w1c16(self, off: int, v: int) -> None:
        self.w1cmask[off : off + 2] = v.to_bytes(2, "little")

    def get16(self, off: int) -> int:
        return int.from_bytes(self.data[off : off + 2], "little")

    def get32(self, off: int) -> int:
        return int.from_bytes(self.data[off : off + 4], "little")

    # ------------------------------------------------------------------ construction
    def _add_bar(self, index: int, bar: Bar) -> None:
        if not 0 <= index < 6:
            raise ValueError(f"BAR index {index} out of range 0..5")
        if self.bars[index] is not None:
            raise ValueError(f"BAR{index} declared twice (or overlaps the upper half of a 64-bit BAR)")
        _check_pow2(bar.size, f"BAR{index} size")
        if bar.kind is BarKind.IO and bar.size < 4:
            raise ValueError(f"BAR{index}: I/O BARs are at least 4 bytes")
        if bar.kind is not BarKind.IO and bar.size < 16:
            raise ValueError(f"BAR{index}: memory BARs are at least 16 bytes")
        if bar.kind is BarKind.MEM32 and bar.size > 1 << 31:
            raise ValueError(f"BAR{index}: a 32-bit BAR cannot be larger than 2 GiB")
        if bar.kind is BarKind.IO and bar.size > 256:
            raise ValueError(f"BAR{index}: I/O BARs are at most 256 bytes")
        off = BAR0 + 4 * index
        self.bars[index] = bar
        self._set32(off, bar.type_bits())
        low_ro = 0x3 if bar.kind is BarKind.IO else 0xF
        self._mask32(off, ~(bar.size - 1) & ~low_ro)
        if bar.kind is BarKind.MEM64:
            if index == 5:
                raise ValueError("BAR5 cannot be a 64-bit BAR (no upper half)")
            if self.bars[index + 1] is not None:
                raise ValueError(f"BAR{index + 1} is the upper half of 64-bit BAR{index}")
            self.bars[index + 1] = bar  # marks the slot used; region_size() reports 0 for it
            self._upper_of.add(index + 1)
            self._mask32(off + 4, ~((bar.size - 1) >> 32))

    def _alloc_cap(self, cap_id: int, length: int) -> int:
        off = self._next_cap
        if off + length > CONFIG_SPACE_SIZE:
            raise ValueError("capabilities do not fit in the 256-byte config space")
        self.data[off] = cap_id
        self.data[off + 1] = 0
        self.data[self._last_cap_next] = off
        self._last_cap_next = off + 1
        self._next_cap = (off + length + 3) & ~3
        self._set16(STATUS, self.get16(STATUS) | STATUS_CAP_LIST)
        return off

    def _add_msi(self, msi: MsiCap) -> int:
        _check_pow2(msi.vectors, "MSI vector count")
        if msi.vectors > 32:
            raise ValueError("MSI supports at most 32 vectors")
        length = 10 + (4 if msi.addr64 else 0) + (10 if msi.per_vector_mask else 0)
        off = self._alloc_cap(CAP_ID_MSI, length)
        mmc = msi.vectors.bit_length() - 1
        flags = mmc << 1
        if msi.addr64:
            flags |= MSI_FLAGS_64BIT
        if msi.per_vector_mask:
            flags |= MSI_FLAGS_MASKBIT
        self._set16(off + 2, flags)
        self._mask16(off + 2, MSI_FLAGS_ENABLE | (0x7 << 4))
        self._mask32(off + 4, 0xFFFFFFFC)
        data_off = off + 8
        if msi.addr64:
            self._mask32(off + 8, 0xFFFFFFFF)
            data_off = off + 12
        self._mask16(data_off, 0xFFFF)
        if msi.per_vector_mask:
            self._mask32(data_off + 4, (1 << msi.vectors) - 1)
        return off

    def _add_msix(self, msix: MsixCap) -> int:
        if not 1 <= msix.vectors <= 2048:
            raise ValueError("MSI-X supports 1..2048 vectors")
        for what, bar, offset, size in (
            ("table", msix.table_bar, msix.table_offset, msix.table_size),
            ("PBA", msix.pba_bar, msix.pba_offset, msix.pba_size),
        ):
            b = self.bars[bar] if 0 <= bar < 6 else None
            if b is None or b.kind is BarKind.IO or bar in self._upper_of:
                raise ValueError(f"MSI-X {what} BAR{bar} is not a memory BAR of the device")
            if offset & 7 or offset + size > b.size:
                raise ValueError(
                    f"MSI-X {what} at {offset:#x}+{size:#x} does not fit BAR{bar} (or unaligned)"
                )
        if msix.table_bar == msix.pba_bar and not (
            msix.pba_offset >= msix.table_offset + msix.table_size
            or msix.table_offset >= msix.pba_offset + msix.pba_size
        ):
            raise ValueError("MSI-X table and PBA overlap")
        off = self._alloc_cap(CAP_ID_MSIX, 12)
        self._set16(off + 2, msix.vectors - 1)
        self._mask16(off + 2, MSIX_FLAGS_MASKALL | MSIX_FLAGS_ENABLE)
        self._set32(off + 4, msix.table_offset | msix.table_bar)
        self._set32(off + 8, msix.pba_offset | msix.pba_bar)
        return off

    def _add_pcie(self, pcie: PcieCap) -> int:
        off = self._alloc_cap(CAP_ID_EXP, 0x3C)
        self._set16(off + 2, 0x2 | (pcie.port_type & 0xF) << 4)  # version 2
        self._set32(off + 4, 0x8000)  # device caps: role-based error reporting, MPS 128
        self._mask16(off + 8, 0x7CFF)  # device control (no FLR bit: FLR not offered)
        self.w1cmask[off + 0xA] = 0x0F  # device status error bits
        self._set32(off + 0xC, 0x11)  # link caps: 2.5 GT/s, x1
        self._mask16(off + 0x10, 0x01C3)
        self._set16(off + 0x12, 0x11)  # link status: 2.5 GT/s, x1
        self._mask16(off + 0x28, 0x0000)
        return off

    # ------------------------------------------------------------------ access
    def bar_region_size(self, index: int) -> int:
        """Size of the vfio region for BAR ``index`` (0 when unused or the upper half of a 64-bit BAR)."""
        bar = self.bars[index]
        if bar is None or index in self._upper_of:
            return 0
        return bar.size

    def read(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes; the caller has checked the range."""
        return bytes(self.data[offset : offset + size])

    def write(self, offset: int, value: bytes) -> None:
        """Write with per-bit rules, then report MSI/MSI-X/command changes to the hooks."""
        old_cmd = self.get16(COMMAND)
        old_msi = self.msi_state()
        old_msix = self.msix_state()
        for i, b in enumerate(value):
            o = offset + i
            wm = self.wmask[o]
            cur = self.data[o]
            new = (cur & ~wm) | (b & wm)
            new &= ~(b & self.w1cmask[o]) & 0xFF
            self.data[o] = new
        new_cmd = self.get16(COMMAND)
        if new_cmd != old_cmd and self.on_command_change:
            self.on_command_change(old_cmd, new_cmd)
        if self.msi:
            new_msi = self.msi_state()
            if new_msi != old_msi:
                log.debug("MSI control %s -> %s", old_msi, new_msi)
                if self.on_msi_change:
                    self.on_msi_change(*new_msi)
        if self.msix:
            new_msix = self.msix_state()
            if new_msix != old_msix:
                log.debug("MSI-X control %s -> %s", old_msix, new_msix)
                if self.on_msix_change:
                    self.on_msix_change(*new_msix)

    def reset(self) -> None:
        """Back to power-on values (BAR bases, command, MSI/MSI-X state cleared)."""
        old_msi, old_msix = self.msi_state(), self.msix_state()
        self.data[:] = self._reset_image
        if self.msi and old_msi[0] and self.on_msi_change:
            self.on_msi_change(*self.msi_state())
        if self.msix and old_msix != self.msix_state() and self.on_msix_change:
            self.on_msix_change(*self.msix_state())

    # ------------------------------------------------------------------ decoded state
    @property
    def command(self) -> int:
        return self.get16(COMMAND)

    def set_status_bits(self, bits: int, on: bool) -> None:
        """Device-side update of status bits (the interrupt status bit for INTx)."""
        st = self.get16(STATUS)
        self._set16(STATUS, (st | bits) if on else (st & ~bits))

    def bar_address(self, index: int) -> int:
        """The base address the guest programmed into BAR ``index``."""
        bar = self.bars[index]
        if bar is None:
            return 0
        low = self.get32(BAR0 + 4 * index) & (~0x3 if bar.kind is BarKind.IO else ~0xF) & 0xFFFFFFFF
        if bar.kind is BarKind.MEM64:
            low |= self.get32(BAR0 + 4 * index + 4) << 32
        return low

    def msi_state(self) -> tuple[bool, int]:
        """(enabled, number of enabled vectors)."""
        if not self.msi:
            return (False, 0)
        flags = self.get16(self.msi_offset + 2)
        mme = min((flags >> 4) & 7, (flags >> 1) & 7)
        return (bool(flags & MSI_FLAGS_ENABLE), 1 << mme)

    def _msi_mask_off(self) -> int:
        assert self.msi
        return self.msi_offset + (16 if self.msi.addr64 else 12)

    def msi_masked(self, vector: int) -> bool:
        if not self.msi or not self.msi.per_vector_mask:
            return False
        return bool(self.get32(self._msi_mask_off()) >> vector & 1)

    def msi_set_pending(self, vector: int, on: bool) -> None:
        if not self.msi or not self.msi.per_vector_mask:
            return
        off = self._msi_mask_off() + 4
        v = self.get32(off)
        self._set32(off, (v | (1 << vector)) if on else (v & ~(1 << vector)))

    def msi_pending(self) -> int:
        if not self.msi or not self.msi.per_vector_mask:
            return 0
        return self.get32(self._msi_mask_off() + 4)

    def msi_message(self) -> tuple[int, int]:
        """(address, data) the guest programmed; informational (the client routes the eventfd)."""
        assert self.msi
        o = self.msi_offset
        addr = self.get32(o + 4)
        if self.msi.addr64:
            return (addr | self.get32(o + 8) << 32, self.get16(o + 12))
        return (addr, self.get16(o + 8))

    def msix_state(self) -> tuple[bool, bool]:
        """(enabled, function masked)."""
        if not self.msix:
            return (False, False)
        flags = self.get16(self.msix_offset + 2)
        return (bool(flags & MSIX_FLAGS_ENABLE), bool(flags & MSIX_FLAGS_MASKALL))


class MsixTable:
    """MSI-X table and pending-bit array as the device's BAR exposes them.

    The table is guest-writable (address, data, vector control); the PBA is read-only to software and
    set by the device when it wants to signal a masked vector.
    """

    def __init__(self, cap: MsixCap) -> None:
        self.cap = cap
        self.table = bytearray(cap.table_size)
        self.pending = [False] * cap.vectors
        self.reset()

    def reset(self) -> None:
        """All vectors masked, nothing pending (the PCI spec's reset state)."""
        self.table[:] = bytes(len(self.table))
        for v in range(self.cap.vectors):
            self.table[v * MSIX_ENTRY_SIZE + 12] = MSIX_ENTRY_CTRL_MASKBIT
        self.pending = [False] * self.cap.vectors

    def vector_masked(self, vector: int) -> bool:
        return bool(self.table[vector * MSIX_ENTRY_SIZE + 12] & MSIX_ENTRY_CTRL_MASKBIT)

    def entry(self, vector: int) -> tuple[int, int, int]:
        """(address, data, control) of a table entry."""
        lo, hi, data, ctrl = struct.unpack_from("<IIII", self.table, vector * MSIX_ENTRY_SIZE)
        return (lo | hi << 32, data, ctrl)

    def covers(self, bar: int, offset: int, size: int) -> str | None:
        """'table' or 'pba' if the access falls in one of them (partially counts), else None."""
        c = self.cap
        end = offset + size
        if bar == c.table_bar and offset < c.table_offset + c.table_size and end > c.table_offset:
            return "table"
        if bar == c.pba_bar and offset < c.pba_offset + c.pba_size and end > c.pba_offset:
            return "pba"
        return None

    def pba_bytes(self) -> bytes:
        bits = 0
        for v, p in enumerate(self.pending):
            if p:
                bits |= 1 << v
        return bits.to_bytes(self.cap.pba_size, "little")

    def read(self, bar: int, offset: int, size: int) -> bytes:
        """Read within a BAR; bytes outside the table/PBA read as zero."""
        out = bytearray(size)
        c = self.cap
        for src, base in ((self.table, c.table_offset), (self.pba_bytes(), c.pba_offset)):
            if (src is self.table and bar != c.table_bar) or (src is not self.table and bar != c.pba_bar):
                continue
            lo = max(offset, base)
            hi = min(offset + size, base + len(src))
            if lo < hi:
                out[lo - offset : hi - offset] = src[lo - base : hi - base]
        return bytes(out)

    def write(self, bar: int, offset: int, data: bytes) -> list[int]:
        """Write the table (PBA writes are ignored); returns the vectors whose mask bit was cleared."""
        c = self.cap
        if bar != c.table_bar:
            return []
        unmasked: list[int] = []
        lo = max(offset, c.table_offset)
        hi = min(offset + len(data), c.table_offset + c.table_size)
        if lo >= hi:
            return []
        first = (lo - c.table_offset) // MSIX_ENTRY_SIZE
        last = (hi - 1 - c.table_offset) // MSIX_ENTRY_SIZE
        before = [self.vector_masked(v) for v in range(first, last + 1)]
        self.table[lo - c.table_offset : hi - c.table_offset] = data[lo - offset : hi - offset]
        for i, v in enumerate(range(first, last + 1)):
            # Reserved control bits read as zero.
            ctrl = v * MSIX_ENTRY_SIZE + 12
            self.table[ctrl] &= MSIX_ENTRY_CTRL_MASKBIT
            self.table[ctrl + 1 : ctrl + 4] = b"\0\0\0"
            if before[i] and not self.vector_masked(v):
                unmasked.append(v)
        return unmasked

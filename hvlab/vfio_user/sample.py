"""A tiny PCI device for testing the vfio-user plumbing end to end (server, client, VMM's vpci).

BAR0 (32-bit memory, 4 KiB) holds 64-bit registers and a 2 KiB buffer; BAR2 (64-bit memory) holds the
MSI-X table and PBA; BAR4 is a 32-byte I/O scratch area. The DMA engine copies between guest memory and
the buffer, so DMA and interrupts can be exercised without a real NIC model.
"""

from __future__ import annotations

import struct

from hvlab.vfio_user.device import PciDevice
from hvlab.vfio_user.pci import Bar, BarKind, MsiCap, MsixCap, PcieCap

REG_ID = 0x00  # RO: ID_VALUE
REG_SCRATCH = 0x08  # RW
REG_DMA_ADDR = 0x10  # RW: guest address
REG_DMA_LEN = 0x18  # RW: byte count (<= BUFFER_SIZE)
REG_DMA_CMD = 0x20  # WO: DMA_TO_DEVICE / DMA_FROM_DEVICE; reads the last status (0 ok, errno)
REG_IRQ = 0x28  # WO: raise interrupt vector <value>
REG_WRITES = 0x30  # RO: number of BAR0 register writes so far (ordering of posted writes)
BUFFER = 0x800
BUFFER_SIZE = 0x800

DMA_TO_DEVICE = 1  # guest memory -> buffer
DMA_FROM_DEVICE = 2  # buffer -> guest memory

ID_VALUE = 0x48564C4142564655  # "UFVBALVH"


class SampleDevice(PciDevice):
    """Registers, a buffer, a DMA engine and interrupts; see the module docstring."""

    vendor_id = 0x1B36
    device_id = 0x0005
    class_code = 0xFF0000
    revision = 1
    bars = {  # noqa: RUF012
        0: Bar(0x1000),
        2: Bar(0x4000, BarKind.MEM64, prefetchable=False),
        4: Bar(0x20, BarKind.IO),
    }
    msi = MsiCap(vectors=4)
    msix = MsixCap(vectors=8, table_bar=2, table_offset=0, pba_bar=2, pba_offset=0x2000)
    pcie = PcieCap()

    def __init__(self, **overrides: object) -> None:
        super().__init__(**overrides)  # type: ignore[arg-type]
        self.regs: dict[int, int] = {}
        self.buffer = bytearray(BUFFER_SIZE)
        self.io = bytearray(0x20)
        self.writes = 0
        self.resets = 0
        self.msi_events: list[tuple[bool, int]] = []
        self.msix_events: list[tuple[bool, bool]] = []
        self._clear()

    def _clear(self) -> None:
        self.regs = {REG_SCRATCH: 0, REG_DMA_ADDR: 0, REG_DMA_LEN: 0, REG_DMA_CMD: 0}
        self.buffer[:] = bytes(BUFFER_SIZE)
        self.io[:] = bytes(0x20)
        self.writes = 0

    def reset(self) -> None:
        self._clear()
        self.resets += 1

    def msi_changed(self, enabled: bool, nvec: int) -> None:
        self.msi_events.append((enabled, nvec))

    def msix_changed(self, enabled: bool, function_masked: bool) -> None:
        self.msix_events.append((enabled, function_masked))

    def bar_read(self, bar: int, offset: int, size: int) -> bytes | int:
        if bar == 4:
            return bytes(self.io[offset : offset + size])
        if bar != 0:
            return 0
        if offset >= BUFFER:
            return bytes(self.buffer[offset - BUFFER : offset - BUFFER + size])
        reg, sub = offset & ~7, offset & 7
        if reg == REG_ID:
            value = ID_VALUE
        elif reg == REG_WRITES:
            value = self.writes
        else:
            value = self.regs.get(reg, 0)
        return struct.pack("<Q", value)[sub : sub + size].ljust(size, b"\0")

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        if bar == 4:
            self.io[offset : offset + len(data)] = data
            return
        if bar != 0:
            return
        if offset >= BUFFER:
            self.buffer[offset - BUFFER : offset - BUFFER + len(data)] = data
            return
        self.writes += 1
        reg, sub = offset & ~7, offset & 7
        old = bytearray(struct.pack("<Q", self.regs.get(reg, 0)))
        old[sub : sub + len(data)] = data[: 8 - sub]
        value = struct.unpack("<Q", old)[0]
        if reg in (REG_SCRATCH, REG_DMA_ADDR, REG_DMA_LEN):
            self.regs[reg] = value
        elif reg == REG_DMA_CMD:
            self.regs[REG_DMA_CMD] = self._dma(value)
        elif reg == REG_IRQ:
            self.irq(value)

    def _dma(self, cmd: int) -> int:
        addr, n = self.regs[REG_DMA_ADDR], min(self.regs[REG_DMA_LEN], BUFFER_SIZE)
        try:
            if cmd == DMA_TO_DEVICE:
                self.buffer[:n] = self.dma_read(addr, n)
            elif cmd == DMA_FROM_DEVICE:
                self.dma_write(addr, self.buffer[:n])
            else:
                return 22
        except OSError as e:
            return e.errno or 5
        return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m hvlab.vfio_user.sample SOCKET``: serve the sample device (e.g. to QEMU's vfio-user-pci)."""
    import argparse
    import logging

    from hvlab.vfio_user.server import VfioUserServer

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("socket", help="Unix socket path to listen on")
    ap.add_argument("--msi-only", action="store_true", help="offer MSI but no MSI-X capability")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    dev = SampleDevice(msix=None) if args.msi_only else SampleDevice()
    server = VfioUserServer(dev, args.socket)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

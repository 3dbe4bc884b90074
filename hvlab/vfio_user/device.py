"""Base class for PCI device models served over vfio-user.

A model declares its identity, BARs and interrupt capabilities as class attributes (or constructor
overrides), implements ``bar_read``/``bar_write``/``reset`` and uses ``dma_read``/``dma_write``/
``dma_view`` and ``irq`` to reach guest memory and raise interrupts. Everything protocol-shaped (config
space rules, MSI-X table and PBA, masking, eventfds, DMA mappings) is done here and in the server so a NIC
model contains only NIC logic.

Threading: the server calls every hook on its loop thread. A model that has work from elsewhere (a packet
from a switch port, a timer) registers it with ``add_reader``/``call_soon``/``call_later`` so it also
runs there; ``irq`` and mmap-backed DMA are safe from any thread, fd-less DMA is marshalled to the loop.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from hvlab.protocol.vfio_user import PciIrq
from hvlab.vfio_user.pci import (
    CMD_INTX_DISABLE,
    STATUS,
    STATUS_INTERRUPT,
    Bar,
    BarKind,
    MsiCap,
    MsixCap,
    MsixTable,
    PciConfigSpace,
    PcieCap,
)

if TYPE_CHECKING:
    from hvlab.vfio_user.server import VfioUserServer

log = logging.getLogger("hvlab.vfio_user")

_UNSET: Any = object()
_ONE = (1).to_bytes(8, "little")


class DmaError(OSError):
    """Guest memory could not be accessed (unmapped address, wrong permission, client refused)."""


def signal_eventfd(fd: int) -> None:
    """Add 1 to an eventfd counter (an interrupt or notification towards the client)."""
    try:
        os.write(fd, _ONE)
    except BlockingIOError:
        pass  # counter saturated: the reader has plenty to wake up for already
    except OSError as e:
        log.warning("cannot signal eventfd %d: %s", fd, e)


def is_eventfd(fd: int) -> bool:
    """True if ``fd`` is an eventfd (Linux fdinfo says so).

    Checked before a client's descriptor is used as an interrupt: anything else (a blocking pipe, a
    socket) could block the server on write or misbehave.
    """
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            return b"eventfd-count:" in f.read()
    except OSError:
        return False


class IrqLines:
    """The client's interrupt wiring for one IRQ index: eventfds and vfio-level mask/pending bits.

    It belongs to the connection, not the device: on disconnect the eventfds are closed and the masks
    forgotten, as the protocol asks, while the device's own (guest-visible) mask state stays.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.fds: list[int | None] = [None] * count
        self.masked = [False] * count
        self.pending = [False] * count
        self.unmask_fd: int | None = None  # INTx resample/unmask notifier

    def set_fd(self, vector: int, fd: int | None) -> None:
        old = self.fds[vector]
        if old is not None and old != fd:
            try:
                os.close(old)
            except OSError:
                pass
        self.fds[vector] = fd

    def clear(self) -> None:
        for v in range(self.count):
            self.set_fd(v, None)
        self.masked = [False] * self.count
        self.pending = [False] * self.count
        if self.unmask_fd is not None:
            try:
                os.close(self.unmask_fd)
            except OSError:
                pass
            self.unmask_fd = None


class PciDevice:
    """Subclass this to write a device. Override the class attributes and the hooks below.

    ``msi``/``msix``/``pcie``/``bars`` may also be overridden per instance through the constructor, for
    example ``MyNic(msix=None)`` to offer MSI only (QEMU 11.1.3 aborts on device_del of a vfio-user device
    that has MSI-X).
    """

    vendor_id: ClassVar[int] = 0
    device_id: ClassVar[int] = 0
    subsystem_vendor_id: ClassVar[int] = 0
    subsystem_id: ClassVar[int] = 0
    class_code: ClassVar[int] = 0xFF0000  # "unassigned class"
    revision: ClassVar[int] = 0
    bars: dict[int, Bar] = {}  # a declaration; never mutated, only copied
    msi: MsiCap | None = None
    msix: MsixCap | None = None
    pcie: PcieCap | None = None
    intx: bool = True
    #: Parts of BARs the client may mmap, {bar: [(offset, size), ...]} (page-aligned). Each such BAR is
    #: backed by a memfd the device sees through ``bar_memory(bar)``; accesses inside the areas never
    #: reach ``bar_read``/``bar_write`` (with mmap the client bypasses the server), so a model polls or
    #: reacts to other events. QEMU stops posting writes once any region is mmap-able.
    mmap_areas: dict[int, list[tuple[int, int]]] = {}  # a declaration; never mutated

    def __init__(
        self,
        *,
        mmap_areas: dict[int, list[tuple[int, int]]] = _UNSET,
        bars: dict[int, Bar] = _UNSET,
        msi: MsiCap | None = _UNSET,
        msix: MsixCap | None = _UNSET,
        pcie: PcieCap | None = _UNSET,
        intx: bool = _UNSET,
    ) -> None:
        if bars is not _UNSET:
            self.bars = dict(bars)
        if msi is not _UNSET:
            self.msi = msi
        if msix is not _UNSET:
            self.msix = msix
        if pcie is not _UNSET:
            self.pcie = pcie
        if intx is not _UNSET:
            self.intx = intx
        if mmap_areas is not _UNSET:
            self.mmap_areas = {b: list(a) for b, a in mmap_areas.items()}
        self.config = PciConfigSpace(
            vendor_id=self.vendor_id,
            device_id=self.device_id,
            class_code=self.class_code,
            revision=self.revision,
            subsystem_vendor_id=self.subsystem_vendor_id,
            subsystem_id=self.subsystem_id,
            bars=self.bars,
            msi=self.msi,
            msix=self.msix,
            pcie=self.pcie,
            interrupt_pin=1 if self.intx else 0,
        )
        self.config.on_msi_change = self._on_msi_change
        self.config.on_msix_change = self._on_msix_change
        self.config.on_command_change = self.command_changed
        self.msix_table = MsixTable(self.msix) if self.msix else None
        # QEMU's vfio-user-pci emulates the MSI-X table itself and never forwards table writes (it masks
        # vectors with SET_IRQS MASK/UNMASK and forwards only PBA reads); hvlab's own VMM forwards the
        # whole BAR. Our table's mask bits therefore count only once the client has written the table.
        self.msix_table_live = False
        self.bar_fds: dict[int, int] = {}
        self._bar_maps: dict[int, mmap.mmap] = {}
        self._setup_mmap_areas()
        self.server: VfioUserServer | None = None
        self.irq_lines: dict[int, IrqLines] = {}
        self.reset_irq_lines()
        self._intx_asserted = False

    # ================================================================== hooks for subclasses
    def bar_read(self, bar: int, offset: int, size: int) -> bytes | int:
        """Read ``size`` bytes at ``offset`` of BAR ``bar``; return bytes or a little-endian integer."""
        return bytes(size)

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of BAR ``bar`` (MSI-X table/PBA writes never arrive here)."""

    def reset(self) -> None:
        """Device-specific reset; config space, MSI-X table and pending bits are reset already."""

    def msi_changed(self, enabled: bool, nvec: int) -> None:
        """The guest enabled or disabled MSI (``nvec`` vectors enabled)."""

    def msix_changed(self, enabled: bool, function_masked: bool) -> None:
        """The guest changed MSI-X enable or function mask."""

    def command_changed(self, old: int, new: int) -> None:
        """The command register changed (bus master, memory/IO decode, INTx disable)."""

    def config_read(self, offset: int, size: int) -> bytes:
        """Config space read; override to add device-specific registers, else leave as is."""
        return self.config.read(offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        """Config space write; override to add device-specific registers, else leave as is."""
        self.config.write(offset, data)

    def connected(self) -> None:
        """A client completed version negotiation."""

    def disconnected(self) -> None:
        """The client went away; DMA is unmapped and interrupt eventfds are closed already."""

    def dma_unmapped(self, address: int, size: int) -> None:
        """A DMA window is about to go: drop any ``dma_view`` memoryviews into it now."""

    # ================================================================== services for subclasses
    def dma_read(self, gpa: int, n: int) -> bytes:
        """Read guest memory (through mmap, or DMA_READ messages for fd-less mappings)."""
        return self._host().dma_read(gpa, n)

    def dma_write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest memory."""
        self._host().dma_write(gpa, data)

    def dma_view(self, gpa: int, n: int, writable: bool = False) -> memoryview | None:
        """Zero-copy view of guest memory when it is mmap-backed and contiguous, else None."""
        return self._host().dma_view(gpa, n, writable)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the server loop thread (thread-safe)."""
        self._host().call_soon(fn, *args)

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the server loop thread after ``delay`` seconds."""
        self._host().call_later(delay, fn, *args)

    def add_reader(self, fd: int, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` on the loop thread whenever ``fd`` is readable."""
        self._host().add_reader(fd, callback)

    def remove_reader(self, fd: int) -> None:
        self._host().remove_reader(fd)

    def irq(self, vector: int = 0) -> bool:
        """Raise interrupt ``vector`` in whatever mode the guest enabled (MSI-X, else MSI, else INTx).

        Masked vectors become pending (MSI-X PBA, MSI pending bits) and fire when unmasked. Returns True
        when an eventfd was signalled now.
        """
        msix_on, fmask = self.config.msix_state()
        if msix_on and self.msix_table is not None:
            if not 0 <= vector < self.msix_table.cap.vectors:
                log.warning(
                    "irq: MSI-X vector %d out of range (device has %d)", vector, self.msix_table.cap.vectors
                )
                return False
            lines = self.irq_lines[PciIrq.MSIX]
            if fmask or self._msix_table_masked(vector) or lines.masked[vector]:
                self.msix_table.pending[vector] = True
                return False
            return self._fire(lines, vector)
        msi_on, nvec = self.config.msi_state()
        if msi_on:
            if not 0 <= vector < nvec:
                log.warning("irq: MSI vector %d but the guest enabled %d", vector, nvec)
                return False
            lines = self.irq_lines[PciIrq.MSI]
            if self.config.msi_masked(vector) or lines.masked[vector]:
                self.config.msi_set_pending(vector, True)
                lines.pending[vector] = True
                return False
            return self._fire(lines, vector)
        return self.intx_assert()

    def intx_assert(self) -> bool:
        """Assert INTx (level; vfio masks it automatically until the client unmasks)."""
        if not self.intx:
            return False
        self.config.set_status_bits(STATUS_INTERRUPT, True)
        lines = self.irq_lines[PciIrq.INTX]
        if self.config.command & CMD_INTX_DISABLE or lines.masked[0]:
            lines.pending[0] = True
            return False
        lines.masked[0] = True  # VFIO_IRQ_INFO_AUTOMASKED
        return self._fire(lines, 0)

    def intx_deassert(self) -> None:
        """The device's interrupt condition is gone."""
        self.config.set_status_bits(STATUS_INTERRUPT, False)
        self.irq_lines[PciIrq.INTX].pending[0] = False

    def signal_error(self) -> bool:
        """Tell the client about an unrecoverable device error (the ERR IRQ index)."""
        return self._fire(self.irq_lines[PciIrq.ERR], 0)

    def request_release(self) -> bool:
        """Ask the client to release the device, e.g. before a hot-unplug (the REQ IRQ index)."""
        return self._fire(self.irq_lines[PciIrq.REQ], 0)

    # ================================================================== internals used by the server
    def _host(self) -> VfioUserServer:
        if self.server is None:
            raise DmaError(errno.ENODEV, "device is not attached to a vfio-user server")
        return self.server

    def irq_count(self, index: int) -> int:
        """How many interrupts of a vfio IRQ index the device has."""
        if index == PciIrq.INTX:
            return 1 if self.intx else 0
        if index == PciIrq.MSI:
            return self.msi.vectors if self.msi else 0
        if index == PciIrq.MSIX:
            return self.msix.vectors if self.msix else 0
        if index in (PciIrq.ERR, PciIrq.REQ):
            return 1
        return 0

    def reset_irq_lines(self) -> None:
        """Forget the client's interrupt wiring (closes eventfds)."""
        for lines in self.irq_lines.values():
            lines.clear()
        self.msix_table_live = False
        self.irq_lines = {int(i): IrqLines(self.irq_count(i)) for i in PciIrq}

    def _fire(self, lines: IrqLines, vector: int) -> bool:
        fd = lines.fds[vector] if vector < lines.count else None
        if fd is None:
            log.debug("irq vector %d: no eventfd wired", vector)
            return False
        signal_eventfd(fd)
        return True

    def vfio_unmask(self, index: int, vector: int) -> None:
        """Client-side unmask (SET_IRQS ACTION_UNMASK): deliver what became pending meanwhile."""
        lines = self.irq_lines[index]
        lines.masked[vector] = False
        if index == PciIrq.INTX:
            if lines.pending[0] and self.config.get16(STATUS) & STATUS_INTERRUPT:
                lines.pending[0] = False
                self.intx_assert()
        elif index == PciIrq.MSIX:
            self._msix_retry(vector)
        elif index == PciIrq.MSI:
            self._msi_retry(vector)

    def _msix_retry(self, vector: int) -> None:
        tbl = self.msix_table
        if tbl is None or not tbl.pending[vector]:
            return
        on, fmask = self.config.msix_state()
        if (
            on
            and not fmask
            and not self._msix_table_masked(vector)
            and not self.irq_lines[PciIrq.MSIX].masked[vector]
        ):
            tbl.pending[vector] = False
            self._fire(self.irq_lines[PciIrq.MSIX], vector)

    def _msix_table_masked(self, vector: int) -> bool:
        return self.msix_table_live and self.msix_table is not None and self.msix_table.vector_masked(vector)

    def _msi_retry(self, vector: int) -> None:
        lines = self.irq_lines[PciIrq.MSI]
        on, nvec = self.config.msi_state()
        if not lines.pending[vector] or not on or vector >= nvec:
            return
        if not self.config.msi_masked(vector) and not lines.masked[vector]:
            lines.pending[vector] = False
            self.config.msi_set_pending(vector, False)
            self._fire(lines, vector)

    def _on_msi_change(self, enabled: bool, nvec: int) -> None:
        self.msi_changed(enabled, nvec)
        if enabled:
            for v in range(nvec):
                self._msi_retry(v)

    def _on_msix_change(self, enabled: bool, function_masked: bool) -> None:
        self.msix_changed(enabled, function_masked)
        if enabled and not function_masked and self.msix_table is not None:
            for v in range(self.msix_table.cap.vectors):
                self._msix_retry(v)

    def handle_config_write(self, offset: int, data: bytes) -> None:
        """Config write entry point for the server; also re-delivers MSI vectors the write unmasked."""
        self.config_write(offset, data)
        if self.msi and self.msi.per_vector_mask:
            for v in range(self.msi.vectors):
                self._msi_retry(v)

    def _setup_mmap_areas(self) -> None:
        page = mmap.PAGESIZE
        for bar, areas in self.mmap_areas.items():
            b = self.bars.get(bar)
            if b is None or b.kind is BarKind.IO or self.config.bar_region_size(bar) == 0:
                raise ValueError(f"mmap_areas: BAR{bar} is not a memory BAR of the device")
            for off, size in areas:
                if off % page or size % page or size == 0 or off + size > b.size:
                    raise ValueError(
                        f"mmap_areas: BAR{bar} area {off:#x}+{size:#x} not page-aligned inside the BAR"
                    )
                if self.msix_table is not None and self.msix_table.covers(bar, off, size):
                    raise ValueError(
                        f"mmap_areas: BAR{bar} area {off:#x}+{size:#x} overlaps the MSI-X table/PBA"
                    )
            fd = os.memfd_create(f"hvlab-bar{bar}", os.MFD_CLOEXEC)
            os.ftruncate(fd, b.size)
            self.bar_fds[bar] = fd
            self._bar_maps[bar] = mmap.mmap(fd, b.size, mmap.MAP_SHARED)

    def close(self) -> None:
        """Release the memfds behind mmap-able BARs (the device is not usable afterwards)."""
        for m in self._bar_maps.values():
            try:
                m.close()
            except BufferError:
                log.warning("bar_memory() view still in use at close")
        for fd in self.bar_fds.values():
            os.close(fd)
        self._bar_maps.clear()
        self.bar_fds.clear()

    def bar_memory(self, bar: int) -> memoryview:
        """The memfd-backed contents of a BAR listed in ``mmap_areas`` (what the client mmaps)."""
        return memoryview(self._bar_maps[bar])

    def mmap_area_of(self, bar: int, offset: int, size: int) -> bool:
        """True if the access lies wholly inside one of the BAR's mmap-able areas."""
        return any(o <= offset and offset + size <= o + n for o, n in self.mmap_areas.get(bar, ()))

    def handle_bar_read(self, bar: int, offset: int, size: int) -> bytes:
        """BAR read entry point for the server: MSI-X table/PBA first, then the model."""
        if self.msix_table is not None and self.msix_table.covers(bar, offset, size):
            return self.msix_table.read(bar, offset, size)
        if bar in self._bar_maps and self.mmap_area_of(bar, offset, size):
            return bytes(self._bar_maps[bar][offset : offset + size])
        value = self.bar_read(bar, offset, size)
        if isinstance(value, int):
            return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        value = bytes(value)
        if len(value) != size:
            log.warning(
                "bar_read(BAR%d, %#x, %d) returned %d bytes; padding/truncating",
                bar,
                offset,
                size,
                len(value),
            )
            value = value[:size].ljust(size, b"\0")
        return value

    def handle_bar_write(self, bar: int, offset: int, data: bytes) -> None:
        """BAR write entry point for the server: MSI-X table/PBA first, then the model."""
        if self.msix_table is not None and self.msix_table.covers(bar, offset, len(data)):
            if self.msix_table.covers(bar, offset, len(data)) == "table":
                self.msix_table_live = True
            for v in self.msix_table.write(bar, offset, data):
                self._msix_retry(v)
            return
        if bar in self._bar_maps and self.mmap_area_of(bar, offset, len(data)):
            self._bar_maps[bar][offset : offset + len(data)] = data
            return
        self.bar_write(bar, offset, data)

    def handle_reset(self) -> None:
        """VFIO_USER_DEVICE_RESET: back to power-on state, the client's eventfds stay wired."""
        self.config.reset()
        if self.msix_table is not None:
            self.msix_table.reset()
        self.msix_table_live = False
        for lines in self.irq_lines.values():
            lines.masked = [False] * lines.count
            lines.pending = [False] * lines.count
        self.reset()

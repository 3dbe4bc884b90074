"""16550A UART (the PC COM port), enough for Linux's 8250 driver: probe, console, interrupts.

Transmission is instantaneous: a byte written to THR goes straight to ``on_output`` (the TX FIFO
is always empty, so LSR.THRE/TEMT are always set and the THRE interrupt re-arms at once, as in
QEMU). Received bytes come from :meth:`feed`; they wait in an unbounded host-side queue and
move into the 16-byte RX FIFO as the guest drains it, so host input is never lost to overruns.

Interrupt output is a level: ``set_irq(True)`` while IIR shows a pending interrupt, called only
on changes. Like QEMU we do not gate the line with MCR.OUT2 (Linux sets OUT2 anyway).
There is no timer: the "character timeout" interrupt is reported at once whenever the RX FIFO
holds fewer bytes than the trigger level, so a guest always sees pending input.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from hvlab.vmm.devices import read_bytes, write_bytes

# register offsets
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01
IER_THRI = 0x02
IER_RLSI = 0x04
IER_MSI = 0x08

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_CTI = 0x0C
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_FIFOE = 0x80
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

FIFO_SIZE = 16
RX_TRIGGER = (1, 4, 8, 14)


class Uart16550:
    """One 16550A at ``base`` (8 ports)."""

    def __init__(
        self,
        base: int,
        on_output: Callable[[bytes], None] | None = None,
        set_irq: Callable[[bool], None] | None = None,
    ) -> None:
        self.base = base
        self.port_ranges = (range(base, base + 8),)
        self.on_output = on_output or (lambda b: None)
        self.set_irq = set_irq or (lambda level: None)
        self.reset()

    def reset(self) -> None:
        self.dll = 0x0C  # 9600 baud
        self.dlm = 0
        self.ier = 0
        self.fcr = 0
        self.lcr = 0x03  # 8N1
        self.mcr = 0
        self.lsr_errors = 0
        self.msr_lines = MSR_DCD | MSR_DSR | MSR_CTS  # host side "connected"
        self.msr_delta = 0
        self.scr = 0
        self.rx: deque[int] = deque()
        self.host_rx: deque[int] = deque()
        self.thr_ipending = False
        self._irq_level = False

    # ------------------------------------------------------------------ host side
    def feed(self, data: bytes) -> None:
        """Queue bytes "received from the line" for the guest to read."""
        self.host_rx.extend(data)
        self._refill()
        self._update_irq()

    @property
    def fifo_enabled(self) -> bool:
        return bool(self.fcr & FCR_ENABLE)

    @property
    def _rx_capacity(self) -> int:
        return FIFO_SIZE if self.fifo_enabled else 1

    def _refill(self) -> None:
        while self.host_rx and len(self.rx) < self._rx_capacity:
            self.rx.append(self.host_rx.popleft())

    def _receive_loopback(self, byte: int) -> None:
        if len(self.rx) >= self._rx_capacity:
            self.lsr_errors |= LSR_OE
        else:
            self.rx.append(byte)

    # ------------------------------------------------------------------ interrupts
    def _iir_source(self) -> int:
        if self.ier & IER_RLSI and self.lsr_errors:
            return IIR_RLSI
        if self.ier & IER_RDI and self.rx:
            if self.fifo_enabled and len(self.rx) < RX_TRIGGER[self.fcr >> 6]:
                return IIR_CTI
            return IIR_RDI
        if self.ier & IER_THRI and self.thr_ipending:
            return IIR_THRI
        if self.ier & IER_MSI and self.msr_delta:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._iir_source() != IIR_NO_INT
        if level != self._irq_level:
            self._irq_level = level
            self.set_irq(level)

    @property
    def irq_level(self) -> bool:
        return self._irq_level

    # ------------------------------------------------------------------ modem lines
    def _msr_value(self) -> int:
        if self.mcr & MCR_LOOP:
            m = self.mcr
            lines = ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                     | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
        else:
            lines = self.msr_lines
        return lines | self.msr_delta

    def _set_lines(self, old: int, new: int) -> None:
        """Record delta bits for a change of the (effective) modem status lines."""
        changed = old ^ new
        if changed & MSR_CTS:
            self.msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self.msr_delta |= MSR_DDSR
        if changed & MSR_DCD:
            self.msr_delta |= MSR_DDCD
        if old & MSR_RI and not new & MSR_RI:  # trailing edge of RI
            self.msr_delta |= MSR_TERI

    def set_modem_lines(self, lines: int) -> None:
        """Host side: set CTS/DSR/RI/DCD (MSR bits 4-7) as seen when not in loopback."""
        old = self._msr_value() & 0xF0
        self.msr_lines = lines & 0xF0
        if not self.mcr & MCR_LOOP:
            self._set_lines(old, self.msr_lines)
        self._update_irq()

    # ------------------------------------------------------------------ register access
    def read_reg(self, off: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if off == RBR_THR_DLL:
            if dlab:
                return self.dll
            val = self.rx.popleft() if self.rx else 0
            self._refill()
            self._update_irq()
            return val
        if off == IER_DLM:
            return self.dlm if dlab else self.ier
        if off == IIR_FCR:
            src = self._iir_source()
            if src == IIR_THRI:
                self.thr_ipending = False  # reading IIR acknowledges THRE
                self._update_irq()
            return src | (IIR_FIFO_ENABLED if self.fifo_enabled else 0)
        if off == LCR:
            return self.lcr
        if off == MCR:
            return self.mcr
        if off == LSR:
            val = LSR_THRE | LSR_TEMT | self.lsr_errors | (LSR_DR if self.rx else 0)
            self.lsr_errors = 0
            self._update_irq()
            return val
        if off == MSR:
            val = self._msr_value()
            self.msr_delta = 0
            self._update_irq()
            return val
        if off == SCR:
            return self.scr
        return 0xFF  # past the 8 registers (a wide access running off the end)

    def write_reg(self, off: int, val: int) -> None:
        val &= 0xFF
        dlab = self.lcr & LCR_DLAB
        if off == RBR_THR_DLL:
            if dlab:
                self.dll = val
                return
            if self.mcr & MCR_LOOP:
                self._receive_loopback(val)
            else:
                self.on_output(bytes([val]))
            self.thr_ipending = True  # transmitted at once: THR empty again
            self._update_irq()
        elif off == IER_DLM:
            if dlab:
                self.dlm = val
                return
            old = self.ier
            self.ier = val & 0x0F
            if (self.ier ^ old) & IER_THRI:
                # enabling THRI while THR is empty raises the interrupt (Linux's TX start relies on it)
                self.thr_ipending = bool(self.ier & IER_THRI)
            self._update_irq()
        elif off == IIR_FCR:
            if (val ^ self.fcr) & FCR_ENABLE:
                self.rx.clear()  # toggling the FIFO enable clears both FIFOs
            if val & FCR_CLEAR_RX:
                self.rx.clear()
            self.fcr = val & (FCR_ENABLE | 0xC0)
            self._refill()
            self._update_irq()
        elif off == LCR:
            self.lcr = val
        elif off == MCR:
            old_lines = self._msr_value() & 0xF0
            self.mcr = val & 0x1F
            self._set_lines(old_lines, self._msr_value() & 0xF0)
            self._update_irq()
        elif off == SCR:
            self.scr = val
        # LSR and MSR are read-only

    def io_read(self, port: int, size: int) -> int:
        return read_bytes(lambda p: self.read_reg(p - self.base), port, size)

    def io_write(self, port: int, size: int, value: int) -> None:
        write_bytes(lambda p, v: self.write_reg(p - self.base, v), port, size, value)

"""ACPI fixed hardware the FADT declares (PM1a event/control, PM timer) and the reset port.

* :class:`PmDevice` at PM_BASE_PORT (0x600, 12 ports): PM1_STS (write 1 to clear), PM1_EN,
  PM1_CNT (SCI_EN always 1 because the FADT has no SMI_CMD; SLP_TYP|SLP_EN with the \\_S5 value
  calls ``on_power_off``), and the 32-bit 3.579545 MHz PM timer from the host's monotonic clock.
  The SCI (IRQ 9, level) is ``set_sci(level)``: high while any enabled status bit is set, which
  happens only when the VMM calls :meth:`PmDevice.press_power_button` (Linux's ACPI button
  driver then runs an orderly power-off).
* :class:`ResetPort` at 0xCF9 (FADT RESET_REG, value 6): writing with bit 2 (RST_CPU) set calls
  ``on_reset``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from hvlab.vmm import layout as L
from hvlab.vmm.devices import read_bytes, write_bytes

PM_TIMER_HZ = 3579545
PM1_STS_TMR = 1 << 0
PM1_STS_GBL = 1 << 5
PM1_STS_PWRBTN = 1 << 8
PM1_STS_WAK = 1 << 15
PM1_EN_MASK = 0x0721  # TMR_EN, GBL_EN, PWRBTN_EN, SLPBTN_EN, RTC_EN
PM1_CNT_SCI_EN = 1 << 0
PM1_CNT_SLP_TYP_SHIFT = 10
PM1_CNT_SLP_EN = 1 << 13
RESET_CF9_RST_CPU = 0x04


class PmDevice:
    """PM1a_EVT (4 bytes), PM1a_CNT (2 bytes, plus 2 unused), PM_TMR (4 bytes)."""

    def __init__(
        self,
        base: int = L.PM_BASE_PORT,
        on_power_off: Callable[[], None] | None = None,
        set_sci: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        s5_slp_typ: int = L.S5_SLP_TYP,
    ) -> None:
        self.base = base
        self.port_ranges = (range(base, base + L.PM_PORT_COUNT),)
        self.on_power_off = on_power_off or (lambda: None)
        self.set_sci = set_sci or (lambda level: None)
        self.clock = clock
        self.t0 = clock()
        self.s5_slp_typ = s5_slp_typ
        self.sts = 0
        self.en = 0
        self.cnt = PM1_CNT_SCI_EN
        self._sci = False
        self.sleep_requests: list[int] = []
        """SLP_TYP values written with SLP_EN (for tests and the timeline)."""

    # ------------------------------------------------------------------ host side
    def press_power_button(self) -> None:
        self.sts |= PM1_STS_PWRBTN
        self._update_sci()

    def timer_value(self) -> int:
        return int((self.clock() - self.t0) * PM_TIMER_HZ) & 0xFFFFFFFF

    def _update_sci(self) -> None:
        level = bool(self.sts & self.en & PM1_EN_MASK) and bool(self.cnt & PM1_CNT_SCI_EN)
        if level != self._sci:
            self._sci = level
            self.set_sci(level)

    # ------------------------------------------------------------------ registers (16-bit)
    def _reg16_read(self, off: int) -> int:
        if off == 0:
            return self.sts
        if off == 2:
            return self.en
        if off == 4:
            return self.cnt
        if off in (8, 10):
            return (self.timer_value() >> (8 * (off - 8))) & 0xFFFF
        return 0

    def _reg16_write(self, off: int, val: int, mask: int) -> None:
        """Write ``val`` to the bits of 16-bit register ``off`` selected by ``mask``."""
        if off == 0:
            self.sts &= ~(val & mask)  # write 1 to clear
        elif off == 2:
            self.en = (self.en & ~mask) | (val & mask & PM1_EN_MASK)
        elif off == 4:
            new = (self.cnt & ~mask) | (val & mask)
            self.cnt = (new & ~PM1_CNT_SLP_EN) | PM1_CNT_SCI_EN  # SLP_EN reads 0; SCI_EN stays set
            if val & mask & PM1_CNT_SLP_EN:
                typ = (new >> PM1_CNT_SLP_TYP_SHIFT) & 7
                self.sleep_requests.append(typ)
                if typ == self.s5_slp_typ:
                    self.on_power_off()
        self._update_sci()

    def io_read(self, port: int, size: int) -> int:
        off = port - self.base
        if off == 8 and size == 4:
            return self.timer_value()  # one consistent 32-bit sample
        return read_bytes(lambda p: self._byte_read(p - self.base), port, size)

    def _byte_read(self, off: int) -> int:
        return (self._reg16_read(off & ~1) >> (8 * (off & 1))) & 0xFF

    def io_write(self, port: int, size: int, value: int) -> None:
        off = port - self.base
        if size >= 2 and off % 2 == 0:
            # whole 16-bit registers at once, so SLP_TYP and SLP_EN in one write act together
            for i in range(0, size, 2):
                self._reg16_write(off + i, (value >> (8 * i)) & 0xFFFF, 0xFFFF)
            return
        write_bytes(lambda p, v: self._byte_write(p - self.base, v), port, size, value)

    def _byte_write(self, off: int, v: int) -> None:
        shift = 8 * (off & 1)
        self._reg16_write(off & ~1, v << shift, 0xFF << shift)


class ResetPort:
    """Port 0xCF9 (Reset Control Register): the FADT's reset register."""

    def __init__(self, on_reset: Callable[[], None] | None = None, port: int = L.RESET_PORT) -> None:
        self.port = port
        self.port_ranges = (range(port, port + 1),)
        self.on_reset = on_reset or (lambda: None)
        self.value = 0

    def io_read(self, port: int, size: int) -> int:
        return self.value

    def io_write(self, port: int, size: int, value: int) -> None:
        self.value = value & 0xFF & ~RESET_CF9_RST_CPU
        if value & RESET_CF9_RST_CPU:
            self.on_reset()

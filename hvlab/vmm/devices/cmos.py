"""MC146818 RTC / CMOS RAM at ports 0x70 (index) and 0x71 (data).

It must exist: without it every read returns 0xFF, "update in progress" never clears and the
kernel polled the port ~20,000 times in the by-hand trial. Time comes from the host clock (plus
an offset the guest may set); register B selects BCD or binary and 12/24-hour format. Status A's
update-in-progress bit is set only during the last 244 us of each second, as on real hardware,
so a reader waits at most that long. Register D reports valid RAM and time.

No periodic/alarm/update interrupts are generated (there is no timer here); register C reads 0.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable

from hvlab.vmm import layout as L

REG_SECONDS = 0x00
REG_MINUTES = 0x02
REG_HOURS = 0x04
REG_DAY_OF_WEEK = 0x06
REG_DAY_OF_MONTH = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = L.CMOS_CENTURY_REG

A_UIP = 0x80
B_SET = 0x80
B_DM_BINARY = 0x04
B_24H = 0x02
D_VRT = 0x80
UIP_WINDOW = 244e-6
TIME_REGS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_DAY_OF_WEEK, REG_DAY_OF_MONTH, REG_MONTH, REG_YEAR,
             REG_CENTURY)


def to_bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0x0F)


class Cmos:
    """RTC + 128 bytes of CMOS RAM. ``clock`` returns UTC seconds since the epoch (injectable)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.port_ranges = (range(L.CMOS_INDEX_PORT, L.CMOS_DATA_PORT + 1),)
        self.clock = clock
        self.offset = 0.0  # guest time - host time, seconds
        self.index = 0
        self.ram = bytearray(128)
        self.ram[REG_A] = 0x26  # 32.768 kHz time base, 1024 Hz rate
        self.ram[REG_B] = B_24H  # BCD, 24-hour
        self._frozen: float | None = None  # guest time while B.SET holds the clock

    # ---------------------------------------------------------------- time
    def _now(self) -> float:
        return self._frozen if self._frozen is not None else self.clock() + self.offset

    def _encode(self, v: int) -> int:
        return v if self.ram[REG_B] & B_DM_BINARY else to_bcd(v)

    def _decode(self, v: int) -> int:
        return v if self.ram[REG_B] & B_DM_BINARY else from_bcd(v)

    def _time_reg(self, reg: int) -> int:
        t = time.gmtime(int(self._now()))
        if reg == REG_SECONDS:
            return self._encode(t.tm_sec)
        if reg == REG_MINUTES:
            return self._encode(t.tm_min)
        if reg == REG_HOURS:
            if self.ram[REG_B] & B_24H:
                return self._encode(t.tm_hour)
            h12 = t.tm_hour % 12 or 12
            return self._encode(h12) | (0x80 if t.tm_hour >= 12 else 0)
        if reg == REG_DAY_OF_WEEK:
            return self._encode((t.tm_wday + 1) % 7 + 1)  # 1 = Sunday; tm_wday 0 = Monday
        if reg == REG_DAY_OF_MONTH:
            return self._encode(t.tm_mday)
        if reg == REG_MONTH:
            return self._encode(t.tm_mon)
        if reg == REG_YEAR:
            return self._encode(t.tm_year % 100)
        return self._encode(t.tm_year // 100)  # century

    def _set_time_reg(self, reg: int, val: int) -> None:
        """A guest write to a time register: rebuild the guest time from all fields."""
        fields = {r: self._time_reg(r) for r in TIME_REGS}
        fields[reg] = val
        if not self.ram[REG_B] & B_24H:
            h = fields[REG_HOURS]
            pm = bool(h & 0x80)
            hour = self._decode(h & 0x7F) % 12 + (12 if pm else 0)
        else:
            hour = self._decode(fields[REG_HOURS])
        try:
            new = calendar.timegm((
                self._decode(fields[REG_CENTURY]) * 100 + self._decode(fields[REG_YEAR]),
                self._decode(fields[REG_MONTH]), self._decode(fields[REG_DAY_OF_MONTH]),
                hour, self._decode(fields[REG_MINUTES]), self._decode(fields[REG_SECONDS]), 0, 0, 0))
        except (ValueError, OverflowError):
            return  # an impossible date: ignore, like a real RTC would produce garbage
        frac = self._now() % 1.0
        if self._frozen is not None:
            self._frozen = new + frac
        else:
            self.offset = new + frac - self.clock()

    def _uip(self) -> bool:
        return (self._now() % 1.0) >= 1.0 - UIP_WINDOW and self._frozen is None

    # ---------------------------------------------------------------- registers
    def read_reg(self, reg: int) -> int:
        if reg in TIME_REGS:
            return self._time_reg(reg)
        if reg == REG_A:
            return (self.ram[REG_A] & 0x7F) | (A_UIP if self._uip() else 0)
        if reg == REG_C:
            return 0  # no interrupt flags: we never raise IRQ 8
        if reg == REG_D:
            return D_VRT
        return self.ram[reg]

    def write_reg(self, reg: int, val: int) -> None:
        if reg in TIME_REGS:
            self._set_time_reg(reg, val)
        elif reg == REG_A:
            self.ram[REG_A] = val & 0x7F  # UIP is read-only
        elif reg == REG_B:
            old = self.ram[REG_B]
            if val & B_SET and not old & B_SET:
                self._frozen = self._now()
            elif old & B_SET and not val & B_SET and self._frozen is not None:
                self.offset = self._frozen - self.clock()
                self._frozen = None
            self.ram[REG_B] = val
        elif reg in (REG_C, REG_D):
            pass  # read-only
        else:
            self.ram[reg] = val

    def io_read(self, port: int, size: int) -> int:
        if port == L.CMOS_INDEX_PORT:
            return 0xFF if size == 1 else (1 << (8 * size)) - 1  # the index register is write-only
        return self.read_reg(self.index)

    def io_write(self, port: int, size: int, value: int) -> None:
        if port == L.CMOS_INDEX_PORT:
            self.index = value & 0x7F  # bit 7 is the NMI mask
            if size > 1:
                self.write_reg(self.index, (value >> 8) & 0xFF)  # outw 0x70: index then data
        else:
            self.write_reg(self.index, value & 0xFF)

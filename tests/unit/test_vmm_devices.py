"""Port-I/O devices driven through io_read/io_write, as the VMM's KVM_EXIT_IO dispatch will."""

from __future__ import annotations

import calendar

import pytest

from hvlab.vmm import acpi
from hvlab.vmm import layout as L
from hvlab.vmm.bus import IoBus
from hvlab.vmm.devices import PortIODevice
from hvlab.vmm.devices import uart as U
from hvlab.vmm.devices.cmos import Cmos
from hvlab.vmm.devices.power import PM_TIMER_HZ, PmDevice, ResetPort

B = L.COM1_PORT


class Rig:
    """A UART on a bus with its output and IRQ line recorded."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.irq_changes: list[bool] = []
        self.u = U.Uart16550(B, on_output=self.out.extend, set_irq=self.irq_changes.append)
        self.bus = IoBus()
        self.bus.add(self.u)

    def inb(self, off: int) -> int:
        return self.bus.read(B + off, 1)

    def outb(self, off: int, v: int) -> None:
        self.bus.write(B + off, 1, v)


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_linux_8250_autoconfig_probe(rig: Rig) -> None:
    """The sequence of drivers/tty/serial/8250/8250_port.c:autoconfig() for a 16550A."""
    # scratch register
    rig.outb(U.SCR, 0xA5)
    assert rig.inb(U.SCR) == 0xA5
    rig.outb(U.SCR, 0x5A)
    assert rig.inb(U.SCR) == 0x5A
    # IER test: write 0, read 0; write 0x0F, read 0x0F
    rig.outb(U.IER_DLM, 0)
    assert rig.inb(U.IER_DLM) & 0x0F == 0
    rig.outb(U.IER_DLM, 0x0F)
    assert rig.inb(U.IER_DLM) & 0x0F == 0x0F
    rig.outb(U.IER_DLM, 0)
    # LCR / DLAB round trip: the divisor latch shadows RBR/IER
    rig.outb(U.LCR, 0x80)
    rig.outb(U.RBR_THR_DLL, 0x01)
    rig.outb(U.IER_DLM, 0x00)
    assert (rig.inb(U.RBR_THR_DLL), rig.inb(U.IER_DLM)) == (0x01, 0x00)
    rig.outb(U.LCR, 0x03)
    assert rig.inb(U.LCR) == 0x03 and rig.inb(U.IER_DLM) == 0
    # loopback: MCR = LOOP | OUT2 | RTS -> MSR high nibble = DCD | CTS
    save_mcr = rig.inb(U.MCR)
    rig.outb(U.MCR, U.MCR_LOOP | 0x0A)
    assert rig.inb(U.MSR) & 0xF0 == 0x90
    rig.outb(U.MCR, save_mcr)
    # FIFO probe: IIR bits 7:6 == 3 means 16550A
    rig.outb(U.IIR_FCR, U.FCR_ENABLE)
    assert rig.inb(U.IIR_FCR) >> 6 == 3
    # "EFR" (offset 2 with LCR=0xBF) must not read 0, or Linux would take us for a 16650
    rig.outb(U.LCR, 0xBF)
    assert rig.inb(U.IIR_FCR) != 0
    rig.outb(U.LCR, 0x03)
    # IER_UUE (bit 6) does not stick: not an XScale
    rig.outb(U.IER_DLM, 0x40)
    assert rig.inb(U.IER_DLM) == 0
    assert rig.out == b"" and not rig.u.irq_level


def test_loopback_msr_reflects_every_mcr_bit(rig: Rig) -> None:
    for mcr, msr in ((0x01, U.MSR_DSR), (0x02, U.MSR_CTS), (0x04, U.MSR_RI), (0x08, U.MSR_DCD)):
        rig.outb(U.MCR, U.MCR_LOOP | mcr)
        assert rig.inb(U.MSR) & 0xF0 == msr
    rig.outb(U.MCR, 0)
    assert rig.inb(U.MSR) & 0xF0 == U.MSR_DCD | U.MSR_DSR | U.MSR_CTS  # host lines when not looped


def test_loopback_data_does_not_reach_output(rig: Rig) -> None:
    rig.outb(U.MCR, U.MCR_LOOP)
    rig.outb(U.RBR_THR_DLL, 0x55)
    assert rig.inb(U.LSR) & U.LSR_DR and rig.inb(U.RBR_THR_DLL) == 0x55
    assert rig.out == b""
    # FIFO off: a second byte before reading overruns
    rig.outb(U.RBR_THR_DLL, 1)
    rig.outb(U.RBR_THR_DLL, 2)
    lsr = rig.inb(U.LSR)
    assert lsr & U.LSR_OE and lsr & U.LSR_DR
    assert not rig.inb(U.LSR) & U.LSR_OE  # cleared by reading LSR


def test_transmit_and_thre_interrupt(rig: Rig) -> None:
    rig.outb(U.IIR_FCR, U.FCR_ENABLE)
    assert rig.inb(U.LSR) & (U.LSR_THRE | U.LSR_TEMT) == U.LSR_THRE | U.LSR_TEMT
    rig.outb(U.IER_DLM, U.IER_THRI)  # enabling THRI with THR empty raises it at once
    assert rig.irq_changes == [True]
    assert rig.inb(U.IIR_FCR) == 0xC0 | U.IIR_THRI
    assert rig.irq_changes == [True, False]  # reading IIR acknowledged it
    assert rig.inb(U.IIR_FCR) == 0xC0 | U.IIR_NO_INT
    for b in b"hi\n":
        rig.outb(U.RBR_THR_DLL, b)
    assert rig.out == b"hi\n"
    assert rig.irq_changes[-1] is True and rig.u.irq_level
    rig.outb(U.IER_DLM, 0)
    assert not rig.u.irq_level


def test_receive_fifo_trigger_and_timeout(rig: Rig) -> None:
    rig.outb(U.IIR_FCR, U.FCR_ENABLE | 0x80)  # trigger level 8
    rig.outb(U.IER_DLM, U.IER_RDI)
    rig.u.feed(b"abc")
    assert rig.u.irq_level
    assert rig.inb(U.IIR_FCR) & 0x0F == U.IIR_CTI  # below trigger: timeout indication
    rig.u.feed(b"defgh")
    assert rig.inb(U.IIR_FCR) & 0x0F == U.IIR_RDI
    got = bytearray()
    while rig.inb(U.LSR) & U.LSR_DR:
        got.append(rig.inb(U.RBR_THR_DLL))
    assert got == b"abcdefgh"
    assert not rig.u.irq_level and rig.inb(U.IIR_FCR) & 1


def test_host_input_beyond_fifo_is_not_lost(rig: Rig) -> None:
    rig.outb(U.IIR_FCR, U.FCR_ENABLE)
    data = bytes(range(200))
    rig.u.feed(data)
    assert len(rig.u.rx) == 16
    got = bytearray()
    while rig.inb(U.LSR) & U.LSR_DR:
        got.append(rig.inb(U.RBR_THR_DLL))
    assert bytes(got) == data
    assert not rig.inb(U.LSR) & U.LSR_OE


def test_receive_without_fifo_one_byte_at_a_time(rig: Rig) -> None:
    rig.outb(U.IER_DLM, U.IER_RDI)
    rig.u.feed(b"xy")
    assert rig.inb(U.IIR_FCR) == U.IIR_RDI  # no FIFO bits
    assert rig.inb(U.RBR_THR_DLL) == ord("x")
    assert rig.inb(U.RBR_THR_DLL) == ord("y")
    assert rig.inb(U.RBR_THR_DLL) == 0 and not rig.u.irq_level


def test_fcr_clears_rx(rig: Rig) -> None:
    rig.outb(U.IIR_FCR, U.FCR_ENABLE)
    rig.u.feed(b"zz")
    rig.outb(U.IIR_FCR, U.FCR_ENABLE | U.FCR_CLEAR_RX)
    assert not rig.inb(U.LSR) & U.LSR_DR


def test_interrupt_priority_rx_over_thre(rig: Rig) -> None:
    rig.outb(U.IER_DLM, U.IER_RDI | U.IER_THRI)
    rig.u.feed(b"q")
    assert rig.inb(U.IIR_FCR) == U.IIR_RDI
    rig.inb(U.RBR_THR_DLL)
    assert rig.inb(U.IIR_FCR) == U.IIR_THRI


def test_modem_status_interrupt(rig: Rig) -> None:
    rig.outb(U.IER_DLM, U.IER_MSI)
    rig.u.set_modem_lines(U.MSR_DSR | U.MSR_CTS)  # carrier drops
    assert rig.u.irq_level and rig.inb(U.IIR_FCR) == U.IIR_MSI
    msr = rig.inb(U.MSR)
    assert msr & U.MSR_DDCD and not msr & U.MSR_DCD
    assert not rig.u.irq_level and not rig.inb(U.MSR) & 0x0F


def test_multibyte_access_and_bus(rig: Rig) -> None:
    rig.bus.write(B + U.LCR, 2, 0x0B03)  # LCR=0x03, MCR=0x0B
    assert rig.u.lcr == 0x03 and rig.u.mcr == 0x0B
    assert rig.bus.read(B + U.LCR, 2) == 0x0B03
    assert rig.bus.read(0x2F8, 1) == 0xFF and rig.bus.read(0x2F8, 4) == 0xFFFFFFFF
    rig.bus.write(0x2F8, 1, 0)  # ignored
    assert rig.bus.device_at(B + 7) is rig.u
    assert isinstance(rig.u, PortIODevice)
    with pytest.raises(ValueError, match="overlaps"):
        rig.bus.add(U.Uart16550(B + 4))


# ---------------------------------------------------------------- CMOS / RTC

T = calendar.timegm((2026, 11, 24, 13, 45, 56, 0, 0, 0)) + 0.5  # a Tuesday


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def cmos_read(c: Cmos, reg: int, nmi_off: bool = False) -> int:
    c.io_write(0x70, 1, reg | (0x80 if nmi_off else 0))
    return c.io_read(0x71, 1)


def cmos_write(c: Cmos, reg: int, val: int) -> None:
    c.io_write(0x70, 1, reg)
    c.io_write(0x71, 1, val)


def test_cmos_bcd_time() -> None:
    c = Cmos(clock=Clock(T))
    got = [cmos_read(c, r) for r in (0, 2, 4, 6, 7, 8, 9, 0x32)]
    assert got == [0x56, 0x45, 0x13, 3, 0x24, 0x11, 0x26, 0x20]
    assert cmos_read(c, 0x0D) == 0x80  # valid RAM and time
    assert cmos_read(c, 0x0B) == 0x02
    assert cmos_read(c, 0x0A) == 0x26  # no UIP mid-second
    assert cmos_read(c, 4, nmi_off=True) == 0x13  # NMI-mask bit is not part of the index
    assert c.io_read(0x70, 1) == 0xFF


def test_cmos_binary_and_12_hour() -> None:
    c = Cmos(clock=Clock(T))
    cmos_write(c, 0x0B, 0x06)  # binary, 24 h
    assert [cmos_read(c, r) for r in (0, 2, 4, 9)] == [56, 45, 13, 26]
    cmos_write(c, 0x0B, 0x04)  # binary, 12 h
    assert cmos_read(c, 4) == 0x81  # 1 PM
    cmos_write(c, 0x0B, 0x00)  # BCD, 12 h
    assert cmos_read(c, 4) == 0x81


def test_cmos_uip_only_at_end_of_second() -> None:
    clk = Clock(int(T) + 0.9999)
    c = Cmos(clock=clk)
    assert cmos_read(c, 0x0A) & 0x80
    clk.t = int(T) + 0.9
    assert not cmos_read(c, 0x0A) & 0x80


def test_cmos_reader_like_linux_polls_little() -> None:
    """mc146818_get_time waits for UIP to clear; across a second of start times it rarely waits."""
    clk = Clock(T)
    c = Cmos(clock=clk)
    reads = 0
    for i in range(1000):
        clk.t = int(T) + i / 1000
        while True:
            reads += 1
            if not cmos_read(c, 0x0A) & 0x80:
                break
            clk.t += 1e-4
    assert reads < 1010


def test_cmos_set_time() -> None:
    clk = Clock(T)
    c = Cmos(clock=clk)
    cmos_write(c, 0x0B, 0x82)  # SET: freeze
    cmos_write(c, 4, 0x07)  # 07:xx
    cmos_write(c, 9, 0x30)  # year 2030
    clk.t += 10
    assert cmos_read(c, 0) == 0x56  # frozen while SET
    cmos_write(c, 0x0B, 0x02)
    clk.t += 3
    assert [cmos_read(c, r) for r in (0, 4, 9)] == [0x59, 0x07, 0x30]
    assert c.offset != 0


def test_cmos_ram_and_readonly_regs() -> None:
    c = Cmos(clock=Clock(T))
    cmos_write(c, 0x40, 0x12)
    assert cmos_read(c, 0x40) == 0x12
    cmos_write(c, 0x0D, 0)
    cmos_write(c, 0x0C, 0xFF)
    assert cmos_read(c, 0x0D) == 0x80 and cmos_read(c, 0x0C) == 0
    c.io_write(0x70, 2, 0x3341)  # outw: index 0x41, data 0x33
    assert cmos_read(c, 0x41) == 0x33


# ---------------------------------------------------------------- ACPI PM and reset


class PmRig:
    def __init__(self) -> None:
        self.off = 0
        self.sci: list[bool] = []
        self.clk = Clock(100.0)
        self.pm = PmDevice(on_power_off=self.power_off, set_sci=self.sci.append, clock=self.clk)

    def power_off(self) -> None:
        self.off += 1


def test_pm_ports_match_fadt() -> None:
    f = acpi.fadt(0, 0)
    pm = PmDevice()
    evt = int.from_bytes(f[56:60], "little")
    cnt = int.from_bytes(f[64:68], "little")
    tmr = int.from_bytes(f[76:80], "little")
    for port in (evt, evt + 3, cnt, cnt + 1, tmr, tmr + 3):
        assert any(port in r for r in pm.port_ranges)


def test_acpi_power_off_like_acpica() -> None:
    r = PmRig()
    port = L.PM1A_CNT_PORT
    assert r.pm.io_read(port, 2) & 1  # SCI_EN: already in ACPI mode
    # ACPICA: write SLP_TYP first, then SLP_TYP | SLP_EN
    r.pm.io_write(port, 2, (L.S5_SLP_TYP << 10) | 1)
    assert r.off == 0
    r.pm.io_write(port, 2, (L.S5_SLP_TYP << 10) | (1 << 13) | 1)
    assert r.off == 1
    assert not r.pm.io_read(port, 2) & (1 << 13)  # SLP_EN reads 0
    # another sleep type is recorded but does not power off
    r.pm.io_write(port, 2, (1 << 10) | (1 << 13))
    assert r.off == 1 and r.pm.sleep_requests == [L.S5_SLP_TYP, 1]


def test_power_off_by_byte_writes() -> None:
    r = PmRig()
    r.pm.io_write(L.PM1A_CNT_PORT + 1, 1, (L.S5_SLP_TYP << 2) | 0x20)
    assert r.off == 1


def test_power_button_sci_and_write_one_to_clear() -> None:
    r = PmRig()
    r.pm.press_power_button()
    assert r.sci == []  # not enabled yet
    r.pm.io_write(L.PM1A_EVT_PORT + 2, 2, 1 << 8)  # PWRBTN_EN
    assert r.sci == [True]
    assert r.pm.io_read(L.PM1A_EVT_PORT, 2) & (1 << 8)
    r.pm.io_write(L.PM1A_EVT_PORT, 2, 0)  # writing 0 changes nothing
    assert r.pm.io_read(L.PM1A_EVT_PORT, 2) & (1 << 8)
    r.pm.io_write(L.PM1A_EVT_PORT, 2, 1 << 8)
    assert r.sci == [True, False] and r.pm.io_read(L.PM1A_EVT_PORT, 4) == 1 << 24


def test_pm_timer() -> None:
    r = PmRig()
    assert r.pm.io_read(L.PM_TMR_PORT, 4) == 0
    r.clk.t += 1.0
    assert r.pm.io_read(L.PM_TMR_PORT, 4) == PM_TIMER_HZ
    r.clk.t += 2000.0  # wraps at 32 bits
    v = r.pm.io_read(L.PM_TMR_PORT, 4)
    assert v == int(2001.0 * PM_TIMER_HZ) & 0xFFFFFFFF
    assert r.pm.io_read(L.PM_TMR_PORT, 2) == v & 0xFFFF


def test_reset_port() -> None:
    resets: list[int] = []
    rp = ResetPort(on_reset=lambda: resets.append(1))
    assert rp.port_ranges == (range(0xCF9, 0xCFA),)
    rp.io_write(0xCF9, 1, 0x02)  # SYS_RST alone: arms, no reset
    assert resets == [] and rp.io_read(0xCF9, 1) == 0x02
    rp.io_write(0xCF9, 1, L.RESET_VALUE)
    assert resets == [1]


def test_all_devices_share_one_bus() -> None:
    bus = IoBus()
    for dev in (U.Uart16550(L.COM1_PORT), U.Uart16550(L.COM2_PORT), Cmos(), PmDevice(), ResetPort()):
        bus.add(dev)
    assert isinstance(bus.device_at(0x71), Cmos)
    assert isinstance(bus.device_at(0x60B), PmDevice)

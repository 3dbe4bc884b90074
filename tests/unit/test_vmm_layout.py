"""The guest memory map: no overlaps, e820 consistent with the RAM slots, windows placed sanely."""

from __future__ import annotations

import pytest

from hvlab.vmm import layout as L

SIZES = [64 * L.MiB, 512 * L.MiB, 3 * L.GiB, 3 * L.GiB + 2 * L.MiB, 8 * L.GiB, L.MAX_GUEST_RAM]


@pytest.mark.parametrize("size", SIZES)
def test_regions_do_not_overlap(size: int) -> None:
    regs = L.MemoryLayout(size).regions()
    for a, b in zip(regs, regs[1:]):
        assert a.end <= b.start, (a, b)
    for r in regs:
        assert r.size > 0, r


@pytest.mark.parametrize("size", SIZES)
def test_e820_matches_ram_slots(size: int) -> None:
    m = L.MemoryLayout(size)
    e = m.e820()
    assert e == sorted(e)
    for (a, s, _), (b, _, _) in zip(e, e[1:]):
        assert a + s <= b
    ram = [(a, s) for a, s, t in e if t == L.E820_RAM]
    # all e820 RAM is backed by a slot, and only the EBDA..1 MiB gap is withheld
    for a, s in ram:
        assert m.is_ram(a, s)
    assert sum(s for _, s in ram) == size - (L.HIGH_MEMORY_START - L.EBDA_START)
    assert sum(sz for _, sz, _ in m.ram_ranges) == size


def test_split_around_hole() -> None:
    m = L.MemoryLayout(4 * L.GiB)
    assert m.ram_ranges == [(0, L.MMIO_HOLE_START, 0), (L.FOUR_GIB, L.GiB, L.MMIO_HOLE_START)]
    assert m.gpa_to_offset(L.FOUR_GIB + 5) == L.MMIO_HOLE_START + 5
    assert m.gpa_to_offset(0x1234) == 0x1234
    with pytest.raises(ValueError):
        m.gpa_to_offset(L.IOAPIC_ADDR)
    assert not m.is_ram(L.VMBUS_LOW_MMIO_START)


def test_small_guest_has_no_high_ram() -> None:
    m = L.MemoryLayout(256 * L.MiB)
    assert m.ram_ranges == [(0, 256 * L.MiB, 0)] and m.high_ram_size == 0


@pytest.mark.parametrize("bad", [32 * L.MiB, L.MAX_GUEST_RAM + 2 * L.MiB, 100 * L.MiB + 4096])
def test_bad_sizes(bad: int) -> None:
    with pytest.raises(ValueError):
        L.MemoryLayout(bad)


def test_fixed_boot_structures_in_low_ram() -> None:
    low = [L.BOOT_GDT_ADDR, L.BOOT_IDT_ADDR, L.ZERO_PAGE_ADDR, L.PML4_ADDR, L.PDPT_ADDR, L.PD_ADDR, L.CMDLINE_ADDR]
    for a in low:
        assert a % 8 == 0 and a + 0x10 < L.EBDA_START
    for a in (L.ZERO_PAGE_ADDR, L.PML4_ADDR, L.PDPT_ADDR, L.PD_ADDR):
        assert a % 4096 == 0
    assert L.PD_ADDR + L.PD_COUNT * 4096 <= L.CMDLINE_ADDR
    assert L.CMDLINE_ADDR + L.CMDLINE_MAX <= L.EBDA_START


def test_io_ports_distinct() -> None:
    ranges = [
        range(L.COM1_PORT, L.COM1_PORT + 8), range(L.COM2_PORT, L.COM2_PORT + 8),
        range(L.CMOS_INDEX_PORT, L.CMOS_DATA_PORT + 1), range(L.PM_BASE_PORT, L.PM_BASE_PORT + L.PM_PORT_COUNT),
        range(L.RESET_PORT, L.RESET_PORT + 1), range(L.HYPERCALL_SLOW_PORT, L.HYPERCALL_SLOW_PORT + 1),
        range(L.HYPERCALL_FAST_PORT, L.HYPERCALL_FAST_PORT + 4),
    ]
    seen: set[int] = set()
    for r in ranges:
        assert not seen & set(r)
        seen |= set(r)
    assert L.PM1A_CNT_PORT == L.PM1A_EVT_PORT + L.PM1_EVT_LEN
    assert L.PM_TMR_PORT + L.PM_TMR_LEN <= L.PM_BASE_PORT + L.PM_PORT_COUNT

"""PCI configuration space helper: BAR sizing, ROM, command/status, capabilities, MSI/MSI-X registers."""

from __future__ import annotations

import pytest

from hvlab.vfio_user import pci
from hvlab.vfio_user.pci import Bar, BarKind, MsiCap, MsixCap, MsixTable, PciConfigSpace, PcieCap


def w32(cs: PciConfigSpace, off: int, v: int) -> None:
    cs.write(off, v.to_bytes(4, "little"))


def w16(cs: PciConfigSpace, off: int, v: int) -> None:
    cs.write(off, v.to_bytes(2, "little"))


def make(**kw) -> PciConfigSpace:
    args = dict(
        vendor_id=0x15AD,
        device_id=0x07B0,
        class_code=0x020000,
        revision=1,
        subsystem_vendor_id=0x15AD,
        subsystem_id=0x07B0,
        bars={
            0: Bar(0x1000),
            1: Bar(0x2000),
            2: Bar(0x10000, BarKind.MEM64, prefetchable=True),
            4: Bar(0x20, BarKind.IO),
        },
    )
    args.update(kw)
    return PciConfigSpace(**args)


def test_identity_is_read_only():
    cs = make()
    assert cs.get16(pci.VENDOR_ID) == 0x15AD and cs.get16(pci.DEVICE_ID) == 0x07B0
    assert cs.data[pci.CLASS_PROG : pci.CLASS_PROG + 3] == bytes([0, 0, 2])
    w32(cs, 0, 0xFFFFFFFF)
    w32(cs, 8, 0xFFFFFFFF)
    assert cs.get32(0) == 0x07B015AD and cs.data[pci.REVISION_ID] == 1
    assert cs.size == 256


@pytest.mark.parametrize(
    ("index", "expect"),
    [(0, 0xFFFFF000), (1, 0xFFFFE000), (2, 0xFFFF0000 | 0xC), (3, 0xFFFFFFFF), (4, 0xFFFFFFE1), (5, 0)],
)
def test_bar_sizing(index, expect):
    cs = make()
    w32(cs, pci.BAR0 + 4 * index, 0xFFFFFFFF)
    assert cs.get32(pci.BAR0 + 4 * index) == expect


def test_bar_type_bits_and_address():
    cs = make()
    assert cs.get32(pci.BAR0 + 8) == 0xC  # 64-bit, prefetchable
    assert cs.get32(pci.BAR0 + 16) == 0x1  # I/O
    w32(cs, pci.BAR0 + 8, 0xFE000000)
    w32(cs, pci.BAR0 + 12, 0x1)
    assert cs.bar_address(2) == 0x1FE000000
    w32(cs, pci.BAR0 + 16, 0xC040)
    assert cs.bar_address(4) == 0xC040 and cs.get32(pci.BAR0 + 16) == 0xC041
    assert cs.bar_region_size(2) == 0x10000 and cs.bar_region_size(3) == 0 and cs.bar_region_size(5) == 0


def test_rom_bar_reads_zero_and_ignores_writes():
    cs = make()
    w32(cs, pci.ROM_ADDRESS, 0xFFFFFFFF)
    assert cs.get32(pci.ROM_ADDRESS) == 0
    w32(cs, pci.ROM_ADDRESS, 0xFFFFF801)
    assert cs.get32(pci.ROM_ADDRESS) == 0


def test_command_writable_bits_and_hook():
    cs = make()
    seen = []
    cs.on_command_change = lambda old, new: seen.append((old, new))
    w16(cs, pci.COMMAND, 0xFFFF)
    assert cs.command == pci.CMD_WRITABLE
    assert seen == [(0, pci.CMD_WRITABLE)]
    w16(cs, pci.COMMAND, pci.CMD_WRITABLE)
    assert len(seen) == 1  # no change, no call


def test_status_write_one_to_clear():
    cs = make(msi=MsiCap())
    cs.data[pci.STATUS + 1] |= 0x80  # detected parity error
    cs.set_status_bits(pci.STATUS_INTERRUPT, True)
    w16(cs, pci.STATUS, 0x0000)
    assert cs.get16(pci.STATUS) & 0x8000
    w16(cs, pci.STATUS, 0xFFFF)
    st = cs.get16(pci.STATUS)
    assert not st & 0x8000
    assert st & pci.STATUS_CAP_LIST and st & pci.STATUS_INTERRUPT  # read-only bits survive


def walk_caps(cs: PciConfigSpace) -> list[tuple[int, int]]:
    out, ptr = [], cs.data[pci.CAPABILITY_LIST]
    while ptr:
        assert ptr >= 0x40 and ptr % 4 == 0
        out.append((cs.data[ptr], ptr))
        ptr = cs.data[ptr + 1]
    return out


def test_capability_chain():
    cs = make(msi=MsiCap(vectors=4), msix=MsixCap(8, 0, 0x800, 0, 0xC00), pcie=PcieCap())
    ids = [cid for cid, _ in walk_caps(cs)]
    assert ids == [pci.CAP_ID_EXP, pci.CAP_ID_MSI, pci.CAP_ID_MSIX]
    assert cs.size == 4096 and cs.get32(0x100) == 0
    assert cs.get16(pci.STATUS) & pci.STATUS_CAP_LIST
    assert not make().get16(pci.STATUS) & pci.STATUS_CAP_LIST and make().data[pci.CAPABILITY_LIST] == 0


def test_msi_registers():
    cs = make(msi=MsiCap(vectors=4))
    o = cs.msi_offset
    events = []
    cs.on_msi_change = lambda en, n: events.append((en, n))
    flags = cs.get16(o + 2)
    assert flags & pci.MSI_FLAGS_64BIT and flags & pci.MSI_FLAGS_MASKBIT and (flags >> 1) & 7 == 2
    w16(cs, o + 2, 0xFFFF)  # enable + MME 7 (clamped to MMC on decode); MMC is read-only
    assert (cs.get16(o + 2) >> 1) & 7 == 2
    assert cs.msi_state() == (True, 4) and events == [(True, 4)]
    w32(cs, o + 4, 0xFEE00003)
    w32(cs, o + 8, 0x1)
    w16(cs, o + 12, 0x4041)
    assert cs.msi_message() == (0x1FEE00000, 0x4041)
    w32(cs, o + 16, 0xFFFFFFFF)  # mask bits: only 4 implemented
    assert cs.get32(o + 16) == 0xF and cs.msi_masked(3)
    cs.msi_set_pending(2, True)
    w32(cs, o + 20, 0)  # pending bits are read-only
    assert cs.msi_pending() == 0b100
    w16(cs, o + 2, 0)
    assert events[-1] == (False, 1)


def test_msi_32bit_without_mask():
    cs = make(msi=MsiCap(vectors=1, addr64=False, per_vector_mask=False))
    o = cs.msi_offset
    assert not cs.get16(o + 2) & (pci.MSI_FLAGS_64BIT | pci.MSI_FLAGS_MASKBIT)
    w32(cs, o + 4, 0xFEE01000)
    w16(cs, o + 8, 0x31)
    assert cs.msi_message() == (0xFEE01000, 0x31)
    assert not cs.msi_masked(0)


def test_msix_registers_and_reset():
    cs = make(msix=MsixCap(vectors=8, table_bar=2, table_offset=0x1000, pba_bar=2, pba_offset=0x2000))
    o = cs.msix_offset
    events = []
    cs.on_msix_change = lambda en, fm: events.append((en, fm))
    assert cs.get16(o + 2) == 7
    assert cs.get32(o + 4) == 0x1002 and cs.get32(o + 8) == 0x2002
    w16(cs, o + 2, 0xFFFF)
    assert cs.get16(o + 2) == 0xC007 and cs.msix_state() == (True, True)
    w32(cs, o + 4, 0)
    assert cs.get32(o + 4) == 0x1002
    w16(cs, o + 2, pci.MSIX_FLAGS_ENABLE)
    assert events == [(True, True), (True, False)]
    w16(cs, pci.COMMAND, pci.CMD_MEMORY)
    cs.reset()
    assert cs.msix_state() == (False, False) and cs.command == 0 and events[-1] == (False, False)


def test_msix_table():
    cap = MsixCap(vectors=4, table_bar=0, table_offset=0x100, pba_bar=0, pba_offset=0x200)
    t = MsixTable(cap)
    assert all(t.vector_masked(v) for v in range(4))
    assert t.covers(0, 0x100, 4) == "table" and t.covers(0, 0x200, 8) == "pba"
    assert t.covers(0, 0x0F0, 4) is None and t.covers(1, 0x100, 4) is None
    t.write(0, 0x110, (0xFEE00000).to_bytes(4, "little"))
    t.write(0, 0x118, (0x55).to_bytes(4, "little"))
    unmasked = t.write(0, 0x11C, (0xFFFFFFFE).to_bytes(4, "little"))
    assert unmasked == [1]
    assert t.entry(1) == (0xFEE00000, 0x55, 0)  # reserved control bits read as zero
    t.pending[3] = True
    assert t.read(0, 0x200, 8) == bytes([0x08]) + bytes(7)
    t.write(0, 0x200, b"\0" * 8)  # PBA is read-only
    assert t.pending[3]
    assert t.read(0, 0x11C, 4) == bytes(4)


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"bars": {0: Bar(0x1800)}}, "power of two"),
        ({"bars": {0: Bar(8)}}, "at least 16"),
        ({"bars": {0: Bar(0x200, BarKind.IO)}}, "at most 256"),
        ({"bars": {5: Bar(0x1000, BarKind.MEM64)}}, "BAR5"),
        ({"bars": {0: Bar(0x1000, BarKind.MEM64), 1: Bar(0x1000)}}, "declared twice|upper half"),
        ({"bars": {6: Bar(0x1000)}}, "out of range"),
        ({"msi": MsiCap(vectors=3)}, "power of two"),
        ({"msix": MsixCap(8, 0, 0xFF8, 0, 0x800)}, "does not fit"),
        ({"msix": MsixCap(8, 4, 0, 4, 0x800)}, "not a memory BAR"),
        ({"msix": MsixCap(8, 0, 0, 0, 0x40)}, "overlap"),
    ],
)
def test_invalid_declarations(kw, msg):
    with pytest.raises(ValueError, match=msg):
        make(**kw)

"""The host-side walk of guest page tables used by hang reports, on hand-built tables."""

from hvlab.vmm import pagewalk

P, W, PS, NX = 1, 2, 1 << 7, 1 << 63
VA = 0xFFFF_FFFF_C05F_70B0  # a module-text address, as in the fetch-fault hangs


class Ram:
    def __init__(self, size: int = 1 << 22) -> None:
        self.data = bytearray(size)

    def entry(self, table: int, index: int, value: int) -> None:
        self.data[table + index * 8:table + index * 8 + 8] = value.to_bytes(8, "little")

    def read(self, gpa: int, length: int) -> bytes | None:
        return bytes(self.data[gpa:gpa + length]) if gpa + length <= len(self.data) else None


def idx(va: int, shift: int) -> int:
    return (va >> shift) & 0x1FF


def tables(ram: Ram, pte: int) -> None:
    ram.entry(0x1000, idx(VA, 39), 0x2000 | P | W)
    ram.entry(0x2000, idx(VA, 30), 0x3000 | P | W)
    ram.entry(0x3000, idx(VA, 21), 0x4000 | P | W)
    ram.entry(0x4000, idx(VA, 12), pte)


def test_a_4k_mapping_leads_to_the_code_bytes() -> None:
    ram = Ram()
    tables(ram, 0x20_0000 | P | (1 << 5))
    ram.data[0x20_00B0:0x20_00B4] = b"\x0f\x1f\x44\x00"
    line = pagewalk.describe(ram.read, 0x1000, 0, VA)
    assert "pt 0x200021 [P A]" in line
    assert line.endswith("-> gpa 0x2000b0: 0f 1f 44 00 00 00 00 00 00 00 00 00 00 00 00 00")


def test_a_non_executable_or_absent_page_shows_where_the_walk_stops() -> None:
    ram = Ram()
    tables(ram, 0x20_0000 | P | NX)
    assert "[P NX]" in pagewalk.describe(ram.read, 0x1000, 0, VA)
    tables(ram, 0)
    line = pagewalk.describe(ram.read, 0x1000, 0, VA)
    assert line.endswith("pt 0x0 [-]") and "gpa" not in line


def test_a_2m_page_and_tables_outside_ram() -> None:
    ram = Ram()
    ram.entry(0x1000, idx(VA, 39), 0x2000 | P)
    ram.entry(0x2000, idx(VA, 30), 0x3000 | P)
    ram.entry(0x3000, idx(VA, 21), 0x20_0000 | P | PS)
    entries, gpa = pagewalk.walk(lambda a: int.from_bytes(ram.read(a, 8), "little"), 0x1000, VA)
    assert [name for name, _ in entries] == ["pml4", "pdpt", "pd"] and gpa == 0x20_0000 | (VA & 0x1F_FFFF)
    ram.entry(0x3000, idx(VA, 21), 0x4000_0000 | P)  # the page table lies beyond RAM
    assert "pt outside RAM" in pagewalk.describe(ram.read, 0x1000, 0, VA)


def test_five_level_paging_adds_a_level() -> None:
    ram = Ram()
    ram.entry(0x5000, idx(VA, 48), 0x1000 | P)
    tables(ram, 0x20_0000 | P)
    line = pagewalk.describe(ram.read, 0x5000, pagewalk.CR4_LA57, VA)
    assert line.startswith(f"walk of {VA:#x}: pml5 0x1001 [P]; pml4 ")

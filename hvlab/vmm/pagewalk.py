"""Walk a guest's x86-64 page tables from the host, for hang reports.

A guest that faults over and over on an instruction fetch (RIP == CR2) either has a page-table entry
that really forbids the fetch, or its CPU is using a stale translation.  Reading the entries the guest
wrote, and the bytes they lead to, from the host's side of guest RAM tells the two apart.
"""

from __future__ import annotations

from collections.abc import Callable

FRAME = 0x000F_FFFF_FFFF_F000
CR4_LA57 = 1 << 12
_FLAGS = ((0, "P"), (1, "W"), (2, "U"), (5, "A"), (6, "D"), (7, "PS"), (8, "G"), (63, "NX"))


def walk(read_u64: Callable[[int], int | None], cr3: int, va: int, *, la57: bool = False
         ) -> tuple[list[tuple[str, int | None]], int | None]:
    """The entries (level name, value; None where the table lies outside RAM) on the way to ``va``,
    and the guest-physical address ``va`` maps to (None if a level is not present or unreadable)."""
    levels = [("pml5", 48)] if la57 else []
    levels += [("pml4", 39), ("pdpt", 30), ("pd", 21), ("pt", 12)]
    table, entries = cr3 & FRAME, []
    for name, shift in levels:
        entry = read_u64(table + ((va >> shift) & 0x1FF) * 8)
        entries.append((name, entry))
        if entry is None or not entry & 1:
            return entries, None
        if name in ("pdpt", "pd") and entry & (1 << 7):  # a 1 GiB or 2 MiB page
            size = 1 << shift
            return entries, (entry & FRAME & ~(size - 1)) | (va & (size - 1))
        table = entry & FRAME
    return entries, (table | (va & 0xFFF))


def flags(entry: int) -> str:
    return " ".join(name for bit, name in _FLAGS if entry >> bit & 1) or "-"


def describe(read: Callable[[int, int], bytes | None], cr3: int, cr4: int, va: int) -> str:
    """One line: each level's entry and flags, then the first bytes at ``va``'s physical address."""

    def read_u64(gpa: int) -> int | None:
        data = read(gpa, 8)
        return None if data is None else int.from_bytes(data, "little")

    entries, gpa = walk(read_u64, cr3, va, la57=bool(cr4 & CR4_LA57))
    parts = [f"{name} {'outside RAM' if e is None else f'{e:#x} [{flags(e)}]'}" for name, e in entries]
    if gpa is not None:
        code = read(gpa, 16)
        parts.append(f"-> gpa {gpa:#x}: {code.hex(' ') if code is not None else 'outside RAM'}")
    return f"walk of {va:#x}: " + "; ".join(parts)

"""Guest-physical memory map and fixed I/O ports of an hvlab guest, declared once.

Everything that boots Linux (boot_params, page tables, ACPI, the KVM memory slots) takes its
addresses from here, so the pieces cannot disagree.

Low memory (the first MiB) follows what Firecracker and QEMU's ``-kernel`` path use and what the
Linux boot protocol expects: the zero page at 0x7000, the page tables right after it, the command
line at 0x20000, the EBDA just below 640 KiB and the ACPI tables in the BIOS area 0xE0000-0xFFFFF,
where Linux also finds the RSDP by scanning (we pass ``acpi_rsdp_addr`` as well).

The 32-bit MMIO hole is 0xC0000000-0xFFFFFFFF (1 GiB). RAM above 3 GiB is moved above 4 GiB.
Inside the hole:

* 0xE0000000-0xEFFFFFFF: the VMBus low MMIO window (256 MiB). HOST_CONTRACT 1.6 recommends
  0xF8000000-0xFED3FFFF, Hyper-V's own choice; but that range covers the IOAPIC (0xFEC00000) and
  HPET (0xFED00000) of our KVM platform, and pci-hyperv would hand out VF BARs on top of them. A
  window that ends below 0xF0000000 avoids every platform device, and 256 MiB is twice the
  recommended minimum. Under BIOS-style boot (ours: no EFI, no Hyper-V video PCI device)
  ``vmbus_reserve_fb`` reserves nothing, so the whole window is usable.
* 0xFEC00000 IOAPIC, 0xFED00000 HPET (not emulated, but kept free), 0xFED40000 vTPM base that
  ``vmbus_walk_resources`` truncates at, 0xFEE00000 LAPIC.
* 0xFFFBC000-0xFFFFFFFF: KVM's private pages (EPT identity map page, 3-page real-mode TSS) that
  KVM_SET_IDENTITY_MAP_ADDR / KVM_SET_TSS_ADDR need on Intel; reserved in e820.

The VMBus high window is 0xF_0000_0000-0xF_3FFF_FFFF (1 GiB, for 64-bit VF BARs), so RAM above
4 GiB may reach up to 60 GiB (64 GiB total guest RAM at most).
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# --- fixed low-memory addresses (all below 1 MiB; Linux reserves that area for itself) ---
BOOT_GDT_ADDR = 0x500
"""Boot GDT: null, (unused), code64 at selector 0x10, data at 0x18."""
BOOT_IDT_ADDR = 0x520
"""An empty IDT (limit 0): interrupts are off at entry, Linux installs its own early."""
BOOT_STACK_TOP = 0x6FF0
"""Initial RSP; the decompressor switches to its own stack almost at once."""
ZERO_PAGE_ADDR = 0x7000
"""struct boot_params (4 KiB); RSI points here at the 64-bit entry."""
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
"""Four page directories at 0xB000-0xEFFF: 2 MiB pages identity-mapping the first 4 GiB."""
PD_COUNT = 4
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
"""Room reserved for the command line; the kernel's own limit is setup_header.cmdline_size."""
EBDA_START = 0x9FC00
LOW_RAM_END_1M = 0xA0000
"""End of conventional memory (640 KiB); 0xA0000-0xDFFFF is the legacy VGA/option ROM hole."""
BIOS_AREA_START = 0xE0000
BIOS_AREA_END = 0x100000
ACPI_TABLES_ADDR = BIOS_AREA_START
"""RSDP first (16-byte aligned, inside the range Linux scans), then the other tables."""
ACPI_TABLES_MAX = BIOS_AREA_END - BIOS_AREA_START
HIGH_MEMORY_START = 0x100000
DEFAULT_KERNEL_ADDR = 0x1000000
"""Used only when a kernel's pref_address is unusable; 16 MiB is the x86 default."""

# --- the 32-bit hole and what lives in it ---
MMIO_HOLE_START = 0xC0000000
MMIO_HOLE_END = 0x1_0000_0000
VMBUS_LOW_MMIO_START = 0xE0000000
VMBUS_LOW_MMIO_END = 0xEFFFFFFF
"""Inclusive end, as written in the ACPI ADDRESS32 descriptor (_MAX)."""
IOAPIC_ADDR = 0xFEC00000
HPET_ADDR = 0xFED00000
VTPM_ADDR = 0xFED40000
LAPIC_ADDR = 0xFEE00000
KVM_IDENTITY_MAP_ADDR = 0xFFFBC000
KVM_TSS_ADDR = 0xFFFBD000
"""Pass with a ctypes ioctl: fcntl.ioctl's int argument is signed 32-bit (ARCHITECTURE pitfalls)."""
KVM_PRIVATE_START = KVM_IDENTITY_MAP_ADDR
FOUR_GIB = 0x1_0000_0000

# --- above 4 GiB ---
HIGH_RAM_START = FOUR_GIB
VMBUS_HIGH_MMIO_START = 0xF_0000_0000
VMBUS_HIGH_MMIO_END = 0xF_3FFF_FFFF
MAX_GUEST_RAM = (MMIO_HOLE_START) + (VMBUS_HIGH_MMIO_START - HIGH_RAM_START)

# --- fixed I/O ports the VMM must answer ---
COM1_PORT, COM1_IRQ = 0x3F8, 4
COM2_PORT, COM2_IRQ = 0x2F8, 3
UART_PORT_COUNT = 8
CMOS_INDEX_PORT = 0x70
CMOS_DATA_PORT = 0x71
CMOS_IRQ = 8
CMOS_CENTURY_REG = 0x32
"""Declared in the FADT's CENTURY field."""
PM_BASE_PORT = 0x600
"""ACPI PM1a register block (same base as QEMU's q35). Layout below; all declared in the FADT."""
PM1A_EVT_PORT = PM_BASE_PORT
"""PM1a_EVT_BLK, 4 bytes: PM1_STS (16 bit, write 1 to clear) then PM1_EN (16 bit)."""
PM1_EVT_LEN = 4
PM1A_CNT_PORT = PM_BASE_PORT + 4
"""PM1a_CNT_BLK, 2 bytes: SCI_EN (reads 1), SLP_TYP (bits 10-12), SLP_EN (bit 13)."""
PM1_CNT_LEN = 2
PM_TMR_PORT = PM_BASE_PORT + 8
"""PM_TMR_BLK, 4 bytes: 3.579545 MHz free-running counter, 32 bits (FADT flag TMR_VAL_EXT)."""
PM_TMR_LEN = 4
PM_PORT_COUNT = 12
SCI_IRQ = 9
"""ACPI SCI: ISA IRQ 9, level-triggered active-high (MADT interrupt source override)."""
RESET_PORT = 0xCF9
"""FADT RESET_REG (system I/O, 8 bit); RESET_VALUE below. Also the classic PCI reset control port."""
RESET_VALUE = 0x06
S5_SLP_TYP = 5
"""SLP_TYP value the DSDT's \\_S5 package names; writing it with SLP_EN to PM1a_CNT powers off."""
HYPERCALL_SLOW_PORT = 0xE0
HYPERCALL_FAST_PORT = 0xE4
"""Ports of the hypercall stub (ARCHITECTURE: by-hand trial); listed so nothing else takes them."""

# e820 types
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3


@dataclass(frozen=True)
class Region:
    """One named range of guest-physical address space; ``end`` is exclusive."""

    name: str
    start: int
    end: int
    kind: str
    """"ram", "reserved", "acpi", "mmio" (device registers) or "window" (VMBus MMIO for the guest)."""

    @property
    def size(self) -> int:
        return self.end - self.start

    def overlaps(self, other: Region) -> bool:
        return self.start < other.end and other.start < self.end


@dataclass(frozen=True)
class MemoryLayout:
    """The memory map of a guest with ``ram_size`` bytes of RAM.

    RAM is split at MMIO_HOLE_START; whatever does not fit below goes above 4 GiB. The lead's KVM
    layer makes one memory slot per entry of :attr:`ram_ranges` (guest address -> offset in one
    host mapping of ``ram_size`` bytes).
    """

    ram_size: int

    def __post_init__(self) -> None:
        if self.ram_size < 64 * MiB:
            raise ValueError(f"guest RAM {self.ram_size:#x} is below the 64 MiB minimum")
        if self.ram_size > MAX_GUEST_RAM:
            raise ValueError(f"guest RAM {self.ram_size:#x} above {MAX_GUEST_RAM:#x} would overlap the VMBus high window")
        if self.ram_size % (2 * MiB):
            raise ValueError("guest RAM must be a multiple of 2 MiB")

    @property
    def low_ram_end(self) -> int:
        """Exclusive end of RAM below the hole."""
        return min(self.ram_size, MMIO_HOLE_START)

    @property
    def high_ram_size(self) -> int:
        return self.ram_size - self.low_ram_end

    @property
    def ram_ranges(self) -> list[tuple[int, int, int]]:
        """(guest physical address, size, offset into the RAM backing) for each RAM slot."""
        out = [(0, self.low_ram_end, 0)]
        if self.high_ram_size:
            out.append((HIGH_RAM_START, self.high_ram_size, self.low_ram_end))
        return out

    def regions(self) -> list[Region]:
        """Every declared region, sorted by address (tests check they do not overlap)."""
        regs = [
            Region("real-mode IVT/BDA", 0, BOOT_GDT_ADDR, "ram"),
            Region("boot GDT/IDT", BOOT_GDT_ADDR, 0x1000, "ram"),
            Region("boot stack", 0x1000, ZERO_PAGE_ADDR, "ram"),
            Region("zero page", ZERO_PAGE_ADDR, ZERO_PAGE_ADDR + 0x1000, "ram"),
            Region("free", ZERO_PAGE_ADDR + 0x1000, PML4_ADDR, "ram"),
            Region("PML4", PML4_ADDR, PML4_ADDR + 0x1000, "ram"),
            Region("PDPT", PDPT_ADDR, PDPT_ADDR + 0x1000, "ram"),
            Region("page directories", PD_ADDR, PD_ADDR + PD_COUNT * 0x1000, "ram"),
            Region("command line", CMDLINE_ADDR, CMDLINE_ADDR + CMDLINE_MAX, "ram"),
            Region("EBDA", EBDA_START, LOW_RAM_END_1M, "reserved"),
            Region("ACPI tables (BIOS area)", BIOS_AREA_START, BIOS_AREA_END, "reserved"),
            Region("RAM (kernel, initrd)", HIGH_MEMORY_START, self.low_ram_end, "ram"),
            Region("VMBus low MMIO window", VMBUS_LOW_MMIO_START, VMBUS_LOW_MMIO_END + 1, "window"),
            Region("IOAPIC", IOAPIC_ADDR, IOAPIC_ADDR + 0x1000, "mmio"),
            Region("HPET (not emulated)", HPET_ADDR, HPET_ADDR + 0x1000, "mmio"),
            Region("LAPIC", LAPIC_ADDR, LAPIC_ADDR + 0x1000, "mmio"),
            Region("KVM identity map + TSS", KVM_PRIVATE_START, FOUR_GIB, "reserved"),
        ]
        if self.high_ram_size:
            regs.append(Region("RAM above 4 GiB", HIGH_RAM_START, HIGH_RAM_START + self.high_ram_size, "ram"))
        regs.append(Region("VMBus high MMIO window", VMBUS_HIGH_MMIO_START, VMBUS_HIGH_MMIO_END + 1, "window"))
        return sorted(regs, key=lambda r: r.start)

    def e820(self) -> list[tuple[int, int, int]]:
        """(address, size, type) entries for boot_params.e820_table, sorted by address.

        The VMBus windows are deliberately absent: hv_vmbus claims them from the ACPI _CRS, and an
        e820 "reserved" entry there would only clutter /proc/iomem. The ACPI tables sit in a
        reserved range, which is what a PC BIOS reports for 0xE0000-0xFFFFF.
        """
        out = [
            (0, EBDA_START, E820_RAM),
            (EBDA_START, LOW_RAM_END_1M - EBDA_START, E820_RESERVED),
            (BIOS_AREA_START, BIOS_AREA_END - BIOS_AREA_START, E820_RESERVED),
            (HIGH_MEMORY_START, self.low_ram_end - HIGH_MEMORY_START, E820_RAM),
            (KVM_PRIVATE_START, FOUR_GIB - KVM_PRIVATE_START, E820_RESERVED),
        ]
        if self.high_ram_size:
            out.append((HIGH_RAM_START, self.high_ram_size, E820_RAM))
        return out

    def is_ram(self, addr: int, size: int = 1) -> bool:
        """True when [addr, addr+size) lies inside guest RAM."""
        return any(gpa <= addr and addr + size <= gpa + sz for gpa, sz, _ in self.ram_ranges)

    def gpa_to_offset(self, addr: int) -> int:
        """Offset of guest-physical ``addr`` in the RAM backing (for writing boot blobs)."""
        for gpa, sz, off in self.ram_ranges:
            if gpa <= addr < gpa + sz:
                return off + addr - gpa
        raise ValueError(f"{addr:#x} is not guest RAM")

"""Linux x86-64 boot protocol: bzImage parsing, the zero page, and the 64-bit entry state.

We enter the kernel at its 64-bit entry point (protected-mode kernel + 0x200), as the boot
protocol's "64-bit boot protocol" section allows, which skips real mode and the 16-bit setup
code entirely: the VMM writes the protected-mode part of the bzImage at its load address, a
zero page (struct boot_params) with the setup header copied from the image and filled in, an
identity-mapped page table, a GDT, and sets the registers. Nothing here touches KVM; the lead's
layer applies :class:`EntryState` with KVM_SET_SREGS/KVM_SET_REGS.

Layouts are ctypes structures (declared once, offsets checked by the tests against the kernel's
arch/x86/include/uapi/asm/bootparam.h).
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field
from typing import Any

from hvlab.errors import HvlabError
from hvlab.vmm import layout as L

HDRS_MAGIC = 0x53726448  # "HdrS"
BOOT_FLAG = 0xAA55
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags, 64-bit entry documented, ext_* fields
SETUP_HEADER_OFFSET = 0x1F1

# loadflags
LOADED_HIGH = 0x01
KASLR_FLAG = 0x02
QUIET_FLAG = 0x20
KEEP_SEGMENTS = 0x40
CAN_USE_HEAP = 0x80
# xloadflags
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02

TYPE_OF_LOADER_UNDEFINED = 0xFF
HEAP_END_PTR = 0xFE00
"""Conventional value (heap end relative to the real-mode start, minus 0x200); unused on 64-bit entry."""
ENTRY64_OFFSET = 0x200
E820_MAX_ENTRIES_ZEROPAGE = 128


class BootError(HvlabError):
    """The kernel image or the boot inputs cannot be booted."""


class SetupHeader(ctypes.LittleEndianStructure):
    """struct setup_header (bootparam.h), at 0x1F1 in both the bzImage and boot_params."""

    _pack_ = 1
    _fields_ = [
        ("setup_sects", ctypes.c_uint8),
        ("root_flags", ctypes.c_uint16),
        ("syssize", ctypes.c_uint32),
        ("ram_size", ctypes.c_uint16),
        ("vid_mode", ctypes.c_uint16),
        ("root_dev", ctypes.c_uint16),
        ("boot_flag", ctypes.c_uint16),
        ("jump", ctypes.c_uint16),
        ("header", ctypes.c_uint32),
        ("version", ctypes.c_uint16),
        ("realmode_swtch", ctypes.c_uint32),
        ("start_sys_seg", ctypes.c_uint16),
        ("kernel_version", ctypes.c_uint16),
        ("type_of_loader", ctypes.c_uint8),
        ("loadflags", ctypes.c_uint8),
        ("setup_move_size", ctypes.c_uint16),
        ("code32_start", ctypes.c_uint32),
        ("ramdisk_image", ctypes.c_uint32),
        ("ramdisk_size", ctypes.c_uint32),
        ("bootsect_kludge", ctypes.c_uint32),
        ("heap_end_ptr", ctypes.c_uint16),
        ("ext_loader_ver", ctypes.c_uint8),
        ("ext_loader_type", ctypes.c_uint8),
        ("cmd_line_ptr", ctypes.c_uint32),
        ("initrd_addr_max", ctypes.c_uint32),
        ("kernel_alignment", ctypes.c_uint32),
        ("relocatable_kernel", ctypes.c_uint8),
        ("min_alignment", ctypes.c_uint8),
        ("xloadflags", ctypes.c_uint16),
        ("cmdline_size", ctypes.c_uint32),
        ("hardware_subarch", ctypes.c_uint32),
        ("hardware_subarch_data", ctypes.c_uint64),
        ("payload_offset", ctypes.c_uint32),
        ("payload_length", ctypes.c_uint32),
        ("setup_data", ctypes.c_uint64),
        ("pref_address", ctypes.c_uint64),
        ("init_size", ctypes.c_uint32),
        ("handover_offset", ctypes.c_uint32),
        ("kernel_info_offset", ctypes.c_uint32),
    ]


class E820Entry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("addr", ctypes.c_uint64), ("size", ctypes.c_uint64), ("type", ctypes.c_uint32)]


class BootParams(ctypes.LittleEndianStructure):
    """struct boot_params, the 4 KiB "zero page". Fields we never set are padding."""

    _pack_ = 1
    _fields_ = [
        ("screen_info", ctypes.c_uint8 * 0x40),  # 0x000
        ("apm_bios_info", ctypes.c_uint8 * 0x14),  # 0x040
        ("_pad2", ctypes.c_uint8 * 4),  # 0x054
        ("tboot_addr", ctypes.c_uint64),  # 0x058
        ("ist_info", ctypes.c_uint8 * 0x10),  # 0x060
        ("acpi_rsdp_addr", ctypes.c_uint64),  # 0x070
        ("_pad3", ctypes.c_uint8 * 8),  # 0x078
        ("hd0_info", ctypes.c_uint8 * 16),  # 0x080
        ("hd1_info", ctypes.c_uint8 * 16),  # 0x090
        ("sys_desc_table", ctypes.c_uint8 * 16),  # 0x0a0
        ("olpc_ofw_header", ctypes.c_uint8 * 16),  # 0x0b0
        ("ext_ramdisk_image", ctypes.c_uint32),  # 0x0c0
        ("ext_ramdisk_size", ctypes.c_uint32),  # 0x0c4
        ("ext_cmd_line_ptr", ctypes.c_uint32),  # 0x0c8
        ("_pad4", ctypes.c_uint8 * 112),  # 0x0cc
        ("cc_blob_address", ctypes.c_uint32),  # 0x13c
        ("edid_info", ctypes.c_uint8 * 0x80),  # 0x140
        ("efi_info", ctypes.c_uint8 * 0x20),  # 0x1c0
        ("alt_mem_k", ctypes.c_uint32),  # 0x1e0
        ("scratch", ctypes.c_uint32),  # 0x1e4
        ("e820_entries", ctypes.c_uint8),  # 0x1e8
        ("eddbuf_entries", ctypes.c_uint8),  # 0x1e9
        ("edd_mbr_sig_buf_entries", ctypes.c_uint8),  # 0x1ea
        ("kbd_status", ctypes.c_uint8),  # 0x1eb
        ("secure_boot", ctypes.c_uint8),  # 0x1ec
        ("_pad5", ctypes.c_uint8 * 2),  # 0x1ed
        ("sentinel", ctypes.c_uint8),  # 0x1ef
        ("_pad6", ctypes.c_uint8 * 1),  # 0x1f0
        ("hdr", SetupHeader),  # 0x1f1
        ("_pad7", ctypes.c_uint8 * (0x290 - 0x1F1 - ctypes.sizeof(SetupHeader))),
        ("edd_mbr_sig_buffer", ctypes.c_uint32 * 16),  # 0x290
        ("e820_table", E820Entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2d0
        ("_pad8", ctypes.c_uint8 * 48),  # 0xcd0
        ("eddbuf", ctypes.c_uint8 * 0x1EC),  # 0xd00
        ("_pad9", ctypes.c_uint8 * 276),  # 0xeec
    ]


assert ctypes.sizeof(SetupHeader) == 0x7B
assert ctypes.sizeof(BootParams) == 4096


@dataclass(frozen=True)
class KernelImage:
    """A parsed bzImage: the header fields the loader needs and the protected-mode blob."""

    header: SetupHeader
    header_bytes: bytes
    """Bytes 0x1F1 up to the end of the setup header as the image declares it (jump target)."""
    setup_size: int
    payload: bytes
    """The protected-mode kernel: the image after the real-mode setup sectors."""

    @property
    def version(self) -> tuple[int, int]:
        return self.header.version >> 8, self.header.version & 0xFF

    @property
    def relocatable(self) -> bool:
        return bool(self.header.relocatable_kernel)

    @property
    def init_size(self) -> int:
        return self.header.init_size

    @property
    def kernel_alignment(self) -> int:
        return self.header.kernel_alignment


def parse_bzimage(data: bytes) -> KernelImage:
    """Parse a bzImage; raise BootError when it cannot be booted through the 64-bit entry."""
    if len(data) < 0x1000:
        raise BootError(f"kernel image too small ({len(data)} bytes) to be a bzImage")
    hdr = SetupHeader.from_buffer_copy(data, SETUP_HEADER_OFFSET)
    if hdr.header != HDRS_MAGIC:
        raise BootError("not a bzImage: no 'HdrS' magic at 0x202 (an ELF vmlinux needs another loader)")
    if hdr.boot_flag != BOOT_FLAG:
        raise BootError(f"bzImage boot_flag {hdr.boot_flag:#x} != 0xaa55")
    if hdr.version < MIN_PROTOCOL:
        raise BootError(f"boot protocol {hdr.version >> 8}.{hdr.version & 0xff} is older than 2.12")
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise BootError("kernel has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)")
    if not hdr.loadflags & LOADED_HIGH:
        raise BootError("kernel is not a bzImage loaded high (zImage is not supported)")
    setup_sects = hdr.setup_sects or 4
    setup_size = (setup_sects + 1) * 512
    if setup_size >= len(data):
        raise BootError("bzImage setup_sects points past the end of the file")
    header_end = 0x202 + data[0x201]  # the jump at 0x200 skips exactly the header
    header_end = min(max(header_end, 0x202 + 4), SETUP_HEADER_OFFSET + ctypes.sizeof(SetupHeader))
    payload = bytes(data[setup_size:])
    if hdr.syssize:
        # syssize counts 16-byte paragraphs of protected-mode code; anything after it (e.g. the
        # Authenticode signature Debian appends to signed kernels) is not part of the kernel.
        payload = payload[: hdr.syssize * 16]
    return KernelImage(
        header=hdr,
        header_bytes=bytes(data[SETUP_HEADER_OFFSET:header_end]),
        setup_size=setup_size,
        payload=payload,
    )


@dataclass(frozen=True)
class Placement:
    """Where the loader puts the kernel, initrd and command line (guest-physical)."""

    kernel_addr: int
    kernel_end: int
    """load address + max(init_size, payload): the kernel decompresses in place up to here."""
    initrd_addr: int
    initrd_size: int
    cmdline_addr: int
    cmdline: bytes
    """NUL-terminated command line as written to guest memory."""

    @property
    def entry64(self) -> int:
        return self.kernel_addr + ENTRY64_OFFSET


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def place(kernel: KernelImage, mem: L.MemoryLayout, cmdline: str | bytes, initrd_size: int = 0) -> Placement:
    """Choose the load addresses.

    The kernel goes to ``pref_address`` (its link address: no relocation work for the
    decompressor) when that is aligned RAM above 1 MiB; otherwise, for a relocatable kernel, the
    first ``kernel_alignment``-aligned address at or above 16 MiB. The initrd goes as high as
    possible in low RAM below ``initrd_addr_max``, page aligned, as boot loaders do; it must not
    overlap the kernel's ``init_size`` area.
    """
    hdr = kernel.header
    align = hdr.kernel_alignment or 2 * L.MiB
    span = max(hdr.init_size, len(kernel.payload))
    addr = hdr.pref_address
    if not (addr >= L.HIGH_MEMORY_START and addr % align == 0 and mem.is_ram(addr, span)):
        if not kernel.relocatable:
            raise BootError(f"non-relocatable kernel wants {addr:#x}, which is not usable RAM")
        addr = _align_up(L.DEFAULT_KERNEL_ADDR, align)
    kernel_end = addr + span
    if not mem.is_ram(addr, span) or kernel_end > mem.low_ram_end:
        raise BootError(f"kernel needs {span:#x} bytes at {addr:#x}: guest RAM too small")

    cmd = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    limit = hdr.cmdline_size or 255
    if len(cmd) > limit:
        raise BootError(f"command line is {len(cmd)} bytes; the kernel accepts at most {limit}")
    if len(cmd) + 1 > L.CMDLINE_MAX:
        raise BootError("command line does not fit the reserved area")

    initrd_addr = 0
    if initrd_size:
        top = min(mem.low_ram_end, hdr.initrd_addr_max + 1)
        initrd_addr = (top - initrd_size) & ~0xFFF
        if initrd_addr < _align_up(kernel_end, 0x1000):
            raise BootError(
                f"initrd of {initrd_size} bytes does not fit between the kernel (ends {kernel_end:#x}) "
                f"and {top:#x}: give the guest more RAM"
            )
    return Placement(addr, kernel_end, initrd_addr, initrd_size, L.CMDLINE_ADDR, cmd + b"\0")


def build_boot_params(
    kernel: KernelImage,
    placement: Placement,
    mem: L.MemoryLayout,
    acpi_rsdp_addr: int = L.ACPI_TABLES_ADDR,
) -> bytes:
    """The 4 KiB zero page: the image's setup header (copied, then filled in) and the e820 map."""
    bp = BootParams()
    raw = (ctypes.c_uint8 * 4096).from_buffer(bp)
    raw[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(kernel.header_bytes)] = kernel.header_bytes
    h = bp.hdr
    h.type_of_loader = TYPE_OF_LOADER_UNDEFINED
    h.loadflags = (h.loadflags | LOADED_HIGH | CAN_USE_HEAP) & ~(KEEP_SEGMENTS | KASLR_FLAG)
    h.heap_end_ptr = HEAP_END_PTR
    h.code32_start = placement.kernel_addr  # informational on the 64-bit path
    h.cmd_line_ptr = placement.cmdline_addr & 0xFFFFFFFF
    bp.ext_cmd_line_ptr = placement.cmdline_addr >> 32
    h.ramdisk_image = placement.initrd_addr & 0xFFFFFFFF
    h.ramdisk_size = placement.initrd_size & 0xFFFFFFFF
    bp.ext_ramdisk_image = placement.initrd_addr >> 32
    bp.ext_ramdisk_size = placement.initrd_size >> 32
    h.vid_mode = 0xFFFF  # "normal": no video mode switch
    bp.acpi_rsdp_addr = acpi_rsdp_addr
    table = mem.e820()
    if len(table) > E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError("too many e820 entries for the zero page")
    for i, (a, s, t) in enumerate(table):
        bp.e820_table[i] = E820Entry(a, s, t)
    bp.e820_entries = len(table)
    return bytes(bp)


def parse_boot_params(data: bytes) -> BootParams:
    """Parse a zero page back (tests, debugging)."""
    return BootParams.from_buffer_copy(data[:4096])


def e820_of(bp: BootParams) -> list[tuple[int, int, int]]:
    return [(e.addr, e.size, e.type) for e in bp.e820_table[: bp.e820_entries]]


# ---------------------------------------------------------------- page tables, GDT, registers

PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_PS = 1 << 7


def build_page_tables() -> dict[int, bytes]:
    """Identity map of the first 4 GiB with 2 MiB pages: {guest address: 4 KiB page}.

    The 64-bit boot protocol needs the kernel (init_size from its load address), the zero page and
    the command line identity-mapped; mapping all of low memory is simplest and covers them for
    any placement. 2 MiB pages avoid depending on the 1 GiB page CPUID bit. The decompressor
    builds its own tables soon after entry (and maps more on demand), so nothing above 4 GiB
    needs mapping.
    """
    pml4 = struct.pack("<Q", L.PDPT_ADDR | PTE_P | PTE_RW) + bytes(4096 - 8)
    pdpt = b"".join(struct.pack("<Q", (L.PD_ADDR + i * 0x1000) | PTE_P | PTE_RW) for i in range(L.PD_COUNT))
    pdpt += bytes(4096 - len(pdpt))
    pages = {L.PML4_ADDR: pml4, L.PDPT_ADDR: pdpt}
    for d in range(L.PD_COUNT):
        pd = b"".join(
            struct.pack("<Q", ((d * 512 + i) << 21) | PTE_P | PTE_RW | PTE_PS) for i in range(512)
        )
        pages[L.PD_ADDR + d * 0x1000] = pd
    return pages


BOOT_CS = 0x10
BOOT_DS = 0x18
GDT_ENTRIES = (
    0x0000000000000000,  # null
    0x0000000000000000,  # unused (Linux's __BOOT_CS is entry 2)
    0x00AF9B000000FFFF,  # 0x10: code, 64-bit (L=1, D=0), present, DPL0, exec/read, accessed, G=1
    0x00CF93000000FFFF,  # 0x18: data, 32-bit flat, present, DPL0, read/write, accessed, G=1
)


def build_gdt() -> bytes:
    return b"".join(struct.pack("<Q", e) for e in GDT_ENTRIES)


def segment_from_gdt(selector: int) -> dict[str, int]:
    """Decode a GDT entry into kvm_segment fields (what KVM expects to match the descriptor)."""
    d = GDT_ENTRIES[selector >> 3]
    limit = (d & 0xFFFF) | ((d >> 32) & 0xF0000)
    g = (d >> 55) & 1
    if g:
        limit = (limit << 12) | 0xFFF
    return {
        "base": ((d >> 16) & 0xFFFFFF) | ((d >> 32) & 0xFF000000),
        "limit": limit,
        "selector": selector,
        "type": (d >> 40) & 0xF,
        "present": (d >> 47) & 1,
        "dpl": (d >> 45) & 3,
        "db": (d >> 54) & 1,
        "s": (d >> 44) & 1,
        "l": (d >> 53) & 1,
        "g": g,
        "avl": (d >> 52) & 1,
        "unusable": 0,
    }


CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1 << 0
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WB = 6
BOOT_MSRS = {
    # What firmware leaves behind: fast strings on, MTRRs enabled with write-back as the default
    # type (without it Linux reports "MTRRs disabled" and skips PAT setup). Never list Hyper-V MSRs
    # (0x40000000..) here: writing them from the host arms KVM's own Hyper-V emulation.
    MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
    MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WB,
}


@dataclass
class EntryState:
    """Registers at the kernel's 64-bit entry, in kvm_regs / kvm_sregs terms.

    Segments are dicts with the kvm_segment field names (base, limit, selector, type, present, dpl,
    db, s, l, g, avl, unusable); tables are (base, limit).
    """

    rip: int
    rsi: int
    rsp: int
    rflags: int = 0x2
    cr0: int = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG
    cr3: int = L.PML4_ADDR
    cr4: int = CR4_PAE
    efer: int = EFER_LME | EFER_LMA
    cs: dict[str, int] = field(default_factory=lambda: segment_from_gdt(BOOT_CS))
    ds: dict[str, int] = field(default_factory=lambda: segment_from_gdt(BOOT_DS))
    es: dict[str, int] = field(default_factory=lambda: segment_from_gdt(BOOT_DS))
    fs: dict[str, int] = field(default_factory=lambda: segment_from_gdt(BOOT_DS))
    gs: dict[str, int] = field(default_factory=lambda: segment_from_gdt(BOOT_DS))
    ss: dict[str, int] = field(default_factory=lambda: segment_from_gdt(BOOT_DS))
    tr: dict[str, int] = field(
        # VM entry requires a usable busy 64-bit TSS in TR; Linux loads its own later.
        default_factory=lambda: {"base": 0, "limit": 0xFFFF, "selector": 0, "type": 11, "present": 1,
                                 "dpl": 0, "db": 0, "s": 0, "l": 0, "g": 0, "avl": 0, "unusable": 0}
    )
    ldt: dict[str, int] = field(
        default_factory=lambda: {"base": 0, "limit": 0xFFFF, "selector": 0, "type": 2, "present": 1,
                                 "dpl": 0, "db": 0, "s": 0, "l": 0, "g": 0, "avl": 0, "unusable": 0}
    )
    gdt: tuple[int, int] = (L.BOOT_GDT_ADDR, len(GDT_ENTRIES) * 8 - 1)
    idt: tuple[int, int] = (L.BOOT_IDT_ADDR, 0)
    msrs: dict[int, int] = field(default_factory=lambda: dict(BOOT_MSRS))
    """MSR index -> value for KVM_SET_MSRS on every vCPU before the first KVM_RUN."""


@dataclass
class BootImage:
    """Everything to write into guest memory, plus the entry state: the lead's VMM copies each
    ``(gpa, bytes)`` of :attr:`blobs` into RAM and applies :attr:`entry`."""

    blobs: list[tuple[int, bytes]]
    entry: EntryState
    placement: Placement
    boot_params: bytes


def prepare_boot(
    kernel_data: bytes,
    mem: L.MemoryLayout,
    cmdline: str | bytes,
    initrd: bytes = b"",
    acpi_tables: bytes = b"",
    acpi_addr: int = L.ACPI_TABLES_ADDR,
) -> BootImage:
    """One call for the VMM: parse, place and build every blob for a direct 64-bit boot.

    ``acpi_tables`` is the blob from :func:`hvlab.vmm.acpi.build_acpi_tables` (RSDP first) built
    for ``acpi_addr``; pass b"" to boot without ACPI (then acpi_rsdp_addr stays 0).
    """
    kernel = parse_bzimage(kernel_data)
    pl = place(kernel, mem, cmdline, len(initrd))
    if len(acpi_tables) > L.ACPI_TABLES_MAX:
        raise BootError("ACPI tables do not fit the BIOS area")
    bp = build_boot_params(kernel, pl, mem, acpi_addr if acpi_tables else 0)
    blobs: list[tuple[int, bytes]] = [
        (L.BOOT_GDT_ADDR, build_gdt()),
        (L.BOOT_IDT_ADDR, bytes(8)),
        (L.ZERO_PAGE_ADDR, bp),
        (pl.cmdline_addr, pl.cmdline),
        (pl.kernel_addr, kernel.payload),
    ]
    blobs += sorted(build_page_tables().items())
    if initrd:
        blobs.append((pl.initrd_addr, bytes(initrd)))
    if acpi_tables:
        blobs.append((acpi_addr, bytes(acpi_tables)))
    entry = EntryState(rip=pl.entry64, rsi=L.ZERO_PAGE_ADDR, rsp=L.BOOT_STACK_TOP)
    return BootImage(blobs=blobs, entry=entry, placement=pl, boot_params=bp)


def describe_entry(e: EntryState) -> dict[str, Any]:
    """A JSON-able summary of the entry state (for the event timeline)."""
    return {"rip": e.rip, "rsi": e.rsi, "cr0": e.cr0, "cr3": e.cr3, "cr4": e.cr4, "efer": e.efer}

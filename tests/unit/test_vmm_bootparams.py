"""Linux boot protocol: bzImage header parsing, placement, zero page, page tables, entry state."""

from __future__ import annotations

import ctypes
import glob
import os
import struct

import pytest

from hvlab.vmm import acpi
from hvlab.vmm import bootparams as B
from hvlab.vmm import layout as L


def make_bzimage(
    *,
    version: int = 0x020F,
    xloadflags: int = 0x7F,
    setup_sects: int = 4,
    payload: bytes = b"\x90" * 0x3000,
    pref_address: int = 0x1000000,
    init_size: int = 0x800000,
    relocatable: int = 1,
    magic: int = B.HDRS_MAGIC,
    trailer: bytes = b"",
) -> bytes:
    """A synthetic bzImage with a complete setup header (fields as a 6.x kernel has them)."""
    setup_size = (setup_sects + 1) * 512
    data = bytearray(setup_size)
    h = B.SetupHeader()
    h.setup_sects = setup_sects
    h.syssize = (len(payload) + 15) // 16
    h.boot_flag = B.BOOT_FLAG
    h.jump = 0xEB | ((0x26C - 0x202) << 8)  # jmp short past the header
    h.header = magic
    h.version = version
    h.loadflags = B.LOADED_HIGH
    h.code32_start = 0x100000
    h.initrd_addr_max = 0x7FFFFFFF
    h.kernel_alignment = 0x200000
    h.relocatable_kernel = relocatable
    h.min_alignment = 21
    h.xloadflags = xloadflags
    h.cmdline_size = 2047
    h.pref_address = pref_address
    h.init_size = init_size
    data[0x1F1 : 0x1F1 + ctypes.sizeof(h)] = bytes(h)
    return bytes(data) + payload + trailer


MEM = L.MemoryLayout(512 * L.MiB)


def test_struct_offsets_match_bootparam_h() -> None:
    off = {name: getattr(B.BootParams, name).offset for name, _ in B.BootParams._fields_}
    assert off["acpi_rsdp_addr"] == 0x070
    assert off["ext_ramdisk_image"] == 0x0C0
    assert off["ext_cmd_line_ptr"] == 0x0C8
    assert off["cc_blob_address"] == 0x13C
    assert off["e820_entries"] == 0x1E8
    assert off["sentinel"] == 0x1EF
    assert off["hdr"] == 0x1F1
    assert off["edd_mbr_sig_buffer"] == 0x290
    assert off["e820_table"] == 0x2D0
    assert off["eddbuf"] == 0xD00
    h = {name: 0x1F1 + getattr(B.SetupHeader, name).offset for name, _ in B.SetupHeader._fields_}
    assert h["boot_flag"] == 0x1FE and h["header"] == 0x202 and h["version"] == 0x206
    assert h["type_of_loader"] == 0x210 and h["loadflags"] == 0x211
    assert h["ramdisk_image"] == 0x218 and h["heap_end_ptr"] == 0x224
    assert h["cmd_line_ptr"] == 0x228 and h["initrd_addr_max"] == 0x22C
    assert h["kernel_alignment"] == 0x230 and h["relocatable_kernel"] == 0x234
    assert h["xloadflags"] == 0x236 and h["cmdline_size"] == 0x238
    assert h["pref_address"] == 0x258 and h["init_size"] == 0x260 and h["kernel_info_offset"] == 0x268


def test_parse_synthetic_image() -> None:
    k = B.parse_bzimage(make_bzimage(trailer=b"SIGNATURE" * 100))
    assert k.version == (2, 15)
    assert k.setup_size == 5 * 512
    assert k.payload == b"\x90" * 0x3000  # the appended signature is cut off at syssize
    assert k.relocatable and k.init_size == 0x800000 and k.kernel_alignment == 0x200000
    assert len(k.header_bytes) == 0x26C - 0x1F1


def test_setup_sects_zero_means_four() -> None:
    img = bytearray(make_bzimage(setup_sects=4))
    img[0x1F1] = 0
    assert B.parse_bzimage(bytes(img)).setup_size == 5 * 512


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"magic": 0x12345678}, "HdrS"),
        ({"version": 0x020B}, "older than 2.12"),
        ({"xloadflags": 0}, "64-bit"),
    ],
)
def test_parse_rejects(kwargs: dict, msg: str) -> None:
    with pytest.raises(B.BootError, match=msg):
        B.parse_bzimage(make_bzimage(**kwargs))


def test_parse_rejects_tiny_file() -> None:
    with pytest.raises(B.BootError):
        B.parse_bzimage(b"MZ")


def test_placement() -> None:
    k = B.parse_bzimage(make_bzimage())
    p = B.place(k, MEM, "console=ttyS0", initrd_size=10 * L.MiB + 5)
    assert p.kernel_addr == 0x1000000 and p.entry64 == 0x1000200
    assert p.kernel_end == 0x1000000 + 0x800000
    assert p.initrd_addr % 4096 == 0
    assert p.initrd_addr + p.initrd_size <= MEM.low_ram_end
    assert MEM.low_ram_end - (p.initrd_addr + p.initrd_size) < 4096
    assert p.cmdline == b"console=ttyS0\0" and p.cmdline_addr == L.CMDLINE_ADDR


def test_placement_respects_initrd_addr_max_on_big_guest() -> None:
    k = B.parse_bzimage(make_bzimage())
    p = B.place(k, L.MemoryLayout(8 * L.GiB), "", initrd_size=L.MiB)
    assert p.initrd_addr + p.initrd_size <= 0x80000000


def test_placement_falls_back_for_bad_pref_address() -> None:
    k = B.parse_bzimage(make_bzimage(pref_address=0x123000))
    assert B.place(k, MEM, "").kernel_addr == 0x1000000
    k = B.parse_bzimage(make_bzimage(pref_address=0x123000, relocatable=0))
    with pytest.raises(B.BootError, match="non-relocatable"):
        B.place(k, MEM, "")


def test_placement_errors() -> None:
    k = B.parse_bzimage(make_bzimage())
    with pytest.raises(B.BootError, match="initrd"):
        B.place(k, MEM, "", initrd_size=600 * L.MiB)
    with pytest.raises(B.BootError, match="command line"):
        B.place(k, MEM, "x" * 2048)
    big = B.parse_bzimage(make_bzimage(init_size=700 * L.MiB))
    with pytest.raises(B.BootError, match="RAM"):
        B.place(big, MEM, "")


def test_boot_params_round_trip() -> None:
    img = make_bzimage()
    k = B.parse_bzimage(img)
    p = B.place(k, MEM, "console=ttyS0 quiet", initrd_size=4 * L.MiB)
    raw = B.build_boot_params(k, p, MEM, acpi_rsdp_addr=0xE0000)
    assert len(raw) == 4096
    bp = B.parse_boot_params(raw)
    h = bp.hdr
    assert h.header == B.HDRS_MAGIC and h.version == 0x020F and h.boot_flag == 0xAA55
    assert h.type_of_loader == 0xFF
    assert h.loadflags & B.LOADED_HIGH and h.loadflags & B.CAN_USE_HEAP
    assert not h.loadflags & B.KEEP_SEGMENTS
    assert h.heap_end_ptr == 0xFE00
    assert h.cmd_line_ptr == L.CMDLINE_ADDR and bp.ext_cmd_line_ptr == 0
    assert (h.ramdisk_image, h.ramdisk_size) == (p.initrd_addr, 4 * L.MiB)
    assert (bp.ext_ramdisk_image, bp.ext_ramdisk_size) == (0, 0)
    assert bp.acpi_rsdp_addr == 0xE0000
    assert B.e820_of(bp) == MEM.e820()
    assert h.setup_sects == 4 and h.init_size == 0x800000  # copied from the image
    # the header bytes are the image's, except the fields a loader writes
    assert raw[0x202:0x210] == img[0x202:0x210]


def test_page_tables_identity_map_4gib() -> None:
    pages = B.build_page_tables()
    mem = {a: d for a, d in pages.items()}

    def entry(table: int, idx: int) -> int:
        return struct.unpack_from("<Q", mem[table], idx * 8)[0]

    def translate(va: int) -> int:
        e4 = entry(L.PML4_ADDR, (va >> 39) & 511)
        assert e4 & B.PTE_P
        e3 = entry(e4 & ~0xFFF, (va >> 30) & 511)
        assert e3 & B.PTE_P and not e3 & B.PTE_PS
        e2 = entry(e3 & ~0xFFF, (va >> 21) & 511)
        assert e2 & B.PTE_P and e2 & B.PTE_PS and e2 & B.PTE_RW
        return (e2 & ~0x1FFFFF & ((1 << 52) - 1)) | (va & 0x1FFFFF)

    for va in (0, L.ZERO_PAGE_ADDR, L.CMDLINE_ADDR, 0x1000200, 0x7FFF_F000, L.IOAPIC_ADDR, 0xFFFF_FFFF):
        assert translate(va) == va
    assert all(len(d) == 4096 for d in pages.values())
    assert entry(L.PML4_ADDR, 1) == 0  # nothing beyond 512 GiB


def test_gdt_and_segments() -> None:
    gdt = B.build_gdt()
    assert len(gdt) == 32 and gdt[:16] == bytes(16)
    cs = B.segment_from_gdt(B.BOOT_CS)
    assert cs["selector"] == 0x10 and cs["l"] == 1 and cs["db"] == 0 and cs["type"] == 0xB
    assert cs["present"] == 1 and cs["s"] == 1 and cs["g"] == 1 and cs["limit"] == 0xFFFFFFFF and cs["base"] == 0
    ds = B.segment_from_gdt(B.BOOT_DS)
    assert ds["selector"] == 0x18 and ds["l"] == 0 and ds["db"] == 1 and ds["type"] == 0x3
    assert set(cs) == {"base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl",
                       "unusable"}


def test_prepare_boot() -> None:
    t = acpi.build_acpi_tables(2)
    bi = B.prepare_boot(make_bzimage(), MEM, "console=ttyS0", initrd=b"I" * 8192, acpi_tables=t.blob)
    e = bi.entry
    assert e.rip == bi.placement.kernel_addr + 0x200 and e.rsi == L.ZERO_PAGE_ADDR
    assert e.cr0 & B.CR0_PE and e.cr0 & B.CR0_PG and e.cr4 & B.CR4_PAE
    assert e.efer == B.EFER_LME | B.EFER_LMA and e.cr3 == L.PML4_ADDR
    assert e.cs["selector"] == 0x10 and e.ss["selector"] == 0x18 and e.tr["type"] == 11
    assert e.gdt == (L.BOOT_GDT_ADDR, 31)
    assert e.msrs[B.MSR_MTRR_DEF_TYPE] == 0x806
    assert not any(0x40000000 <= m <= 0x400000FF for m in e.msrs)  # never Hyper-V MSRs from the host
    spans = sorted((a, a + len(d)) for a, d in bi.blobs)
    for (_a0, a1), (b0, _) in zip(spans, spans[1:]):
        assert a1 <= b0, "blobs overlap"
    for a, d in bi.blobs:
        assert MEM.is_ram(a, len(d)) or L.BIOS_AREA_START <= a < L.BIOS_AREA_END
    bp = B.parse_boot_params(bi.boot_params)
    assert bp.acpi_rsdp_addr == t.rsdp_addr
    assert B.describe_entry(e)["rip"] == e.rip


def test_prepare_boot_without_acpi() -> None:
    bi = B.prepare_boot(make_bzimage(), MEM, "")
    assert B.parse_boot_params(bi.boot_params).acpi_rsdp_addr == 0
    assert bi.placement.initrd_size == 0


REAL_KERNELS = sorted(
    {os.environ.get("HVLAB_TEST_BZIMAGE", "")} - {""}
    | set(glob.glob("/boot/vmlinuz-*"))
)


@pytest.mark.skipif(not REAL_KERNELS, reason="no bzImage here (set HVLAB_TEST_BZIMAGE)")
def test_real_kernel() -> None:
    for path in REAL_KERNELS:
        with open(path, "rb") as f:
            data = f.read()
        k = B.parse_bzimage(data)
        assert k.header.xloadflags & B.XLF_KERNEL_64
        bi = B.prepare_boot(data, L.MemoryLayout(512 * L.MiB), "console=ttyS0", initrd=bytes(4096))
        assert bi.entry.rip == bi.placement.kernel_addr + 0x200

"""ACPI tables for an hvlab guest: RSDP, XSDT, FADT, FACS, MADT and a DSDT with the VMBus device.

Design choices (why):

* **Non-hardware-reduced FADT** (revision 6). With a hardware-reduced FADT Linux installs the
  "null" legacy PIC (``acpi_generic_reduced_hw_init``), so ISA IRQs 0-15 get no identity
  GSI mapping and the 16550's IRQ 4 never fired in the by-hand trial. A classic FADT keeps the
  legacy PIC/ISA IRQ model (MADT flag PCAT_COMPAT, identity ISA IRQ -> IOAPIC pin) and lets the serial driver use
  IRQ 4/3. The UARTs and the RTC are declared as PNP0501/PNP0B00 devices in the DSDT as well,
  which is what a PC does and what 8250_pnp/rtc_cmos bind to.
* A non-reduced FADT needs the PM1a event/control blocks and (by convention) a PM timer; they
  live at the fixed ports of :mod:`hvlab.vmm.layout` (0x600..) and are answered by
  :class:`hvlab.vmm.devices.power.PmDevice`. SMI_CMD is 0, so the guest finds the platform already
  in ACPI mode (SCI_EN reads 1) and never talks to an SMI port. The SCI is ISA IRQ 9, level
  triggered, active high (MADT override), and fires only for the fixed power button, which the
  VMM can "press" for an orderly guest shutdown.
* Reset: FADT RESET_REG = system I/O port 0xCF9, value 6 (Linux's default reboot method on x86
  is ACPI). Power-off: ``\\_S5`` names SLP_TYP 5; Linux writes SLP_TYP|SLP_EN to PM1a_CNT.
* 8042 absent (IAPC_BOOT_ARCH bit 1 clear): Linux then skips i8042 probing, which would cost
  port exits and a timeout. VGA absent for the same reason.
* VMBus as on Hyper-V Gen2: ``\\_SB.VMOD`` (_HID ACPI0004) carries the MMIO windows as
  DWordMemory/QWordMemory (hv_vmbus reads only ADDRESS32/ADDRESS64 min..max, walking up to the
  first ancestor with ranges: HOST_CONTRACT 1.6), and ``\\_SB.VMOD.VMBS`` has _HID "VMBus"
  (ACPICA upper-cases _HID strings; Linux matches "VMBUS" and "VMBus").
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from hvlab.vmm import aml
from hvlab.vmm import layout as L

OEM_ID = b"HVLAB "
OEM_TABLE_ID = b"HVLAB   "
OEM_REVISION = 1
CREATOR_ID = b"HVLB"
CREATOR_REVISION = 1
HEADER_SIZE = 36
HEADER_FMT = "<4sIBB6s8sI4sI"

# Generic Address Structure address spaces
GAS_SYSTEM_MEMORY = 0
GAS_SYSTEM_IO = 1

# FADT flags (ACPI 6.5 table 5.10)
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4  # set = no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # set = no fixed-feature sleep button
FADT_TMR_VAL_EXT = 1 << 8
FADT_RESET_REG_SUP = 1 << 10
FADT_HEADLESS = 1 << 12
FADT_HW_REDUCED_ACPI = 1 << 20
# IAPC_BOOT_ARCH
BOOT_ARCH_LEGACY_DEVICES = 1 << 0
BOOT_ARCH_8042 = 1 << 1
BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
BOOT_ARCH_CMOS_RTC_NOT_PRESENT = 1 << 5

FADT_REVISION = 6
FADT_LENGTH = 276
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1
# MADT interrupt source override flags: polarity bits 0-1, trigger bits 2-3
MPS_INTI_CONFORMS = 0x0
MPS_ACTIVE_HIGH = 0x1
MPS_ACTIVE_LOW = 0x3
MPS_EDGE = 0x4
MPS_LEVEL = 0xC

PM1_STS_TMR = 1 << 0
PM1_STS_PWRBTN = 1 << 8
PM1_STS_WAK = 1 << 15
PM1_CNT_SCI_EN = 1 << 0
PM1_CNT_SLP_TYP_SHIFT = 10
PM1_CNT_SLP_TYP_MASK = 0x7 << 10
PM1_CNT_SLP_EN = 1 << 13


def gas(space: int, bit_width: int, address: int, bit_offset: int = 0, access_size: int = 0) -> bytes:
    """Generic Address Structure (12 bytes). Access size 0 = "use bit width", as QEMU emits."""
    return struct.pack("<BBBBQ", space, bit_width, bit_offset, access_size, address)


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with a zero in the checksum field) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes, oem_table_id: bytes = OEM_TABLE_ID) -> bytes:
    """A System Description Table: standard 36-byte header + body, checksum filled in."""
    length = HEADER_SIZE + len(body)
    hdr = struct.pack(HEADER_FMT, signature, length, revision, 0, OEM_ID, oem_table_id,
                      OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    t = bytearray(hdr + body)
    t[9] = checksum(t)
    return bytes(t)


def rsdp(xsdt_addr: int) -> bytes:
    """RSDP revision 2 (36 bytes): checksum over the first 20 bytes, extended over all 36."""
    t = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt_addr, 0, b"\0\0\0"))
    t[8] = checksum(t[:20])
    t[32] = checksum(t)
    return bytes(t)


def xsdt(entries: Sequence[int]) -> bytes:
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in entries))


def facs() -> bytes:
    """FACS (64 bytes, no checksum). Required by a non-reduced FADT (global lock, waking vector)."""
    return struct.pack("<4sIIIIIQB3sI24s", b"FACS", 64, 0, 0, 0, 0, 0, 2, bytes(3), 0, bytes(24))


def fadt(dsdt_addr: int, facs_addr: int) -> bytes:
    """FADT revision 6, not hardware-reduced; legacy 32-bit and X_ 64-bit blocks agree."""
    flags = FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_TMR_VAL_EXT | FADT_RESET_REG_SUP | FADT_HEADLESS
    boot_arch = BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_VGA_NOT_PRESENT
    body = b"".join([
        struct.pack("<II", facs_addr, dsdt_addr),
        struct.pack("<BBH", 0, 0, L.SCI_IRQ),  # reserved (INT_MODEL), PM profile unspecified, SCI_INT
        struct.pack("<IBBBB", 0, 0, 0, 0, 0),  # SMI_CMD=0: always in ACPI mode; ACPI_ENABLE/DISABLE, S4BIOS, PSTATE
        struct.pack("<IIIIIIII", L.PM1A_EVT_PORT, 0, L.PM1A_CNT_PORT, 0, 0, L.PM_TMR_PORT, 0, 0),
        struct.pack("<BBBBBBBB", L.PM1_EVT_LEN, L.PM1_CNT_LEN, 0, L.PM_TMR_LEN, 0, 0, 0, 0),
        struct.pack("<HHHH", 101, 1001, 0, 0),  # C2/C3 latencies above the limits: not supported
        struct.pack("<BBBBB", 0, 0, 0, 0, L.CMOS_CENTURY_REG),
        struct.pack("<HBI", boot_arch, 0, flags),
        gas(GAS_SYSTEM_IO, 8, L.RESET_PORT),
        struct.pack("<BHB", L.RESET_VALUE, 0, 0),  # RESET_VALUE, ARM_BOOT_ARCH, FADT minor version
        struct.pack("<QQ", 0, dsdt_addr),  # X_FIRMWARE_CTRL (0: the 32-bit one is used), X_DSDT
        gas(GAS_SYSTEM_IO, L.PM1_EVT_LEN * 8, L.PM1A_EVT_PORT),
        gas(GAS_SYSTEM_IO, 0, 0),
        gas(GAS_SYSTEM_IO, L.PM1_CNT_LEN * 8, L.PM1A_CNT_PORT),
        gas(GAS_SYSTEM_IO, 0, 0),
        gas(GAS_SYSTEM_IO, 0, 0),  # PM2
        gas(GAS_SYSTEM_IO, L.PM_TMR_LEN * 8, L.PM_TMR_PORT),
        gas(GAS_SYSTEM_IO, 0, 0),  # GPE0
        gas(GAS_SYSTEM_IO, 0, 0),  # GPE1
        gas(GAS_SYSTEM_MEMORY, 0, 0),  # SLEEP_CONTROL_REG (hardware-reduced only)
        gas(GAS_SYSTEM_MEMORY, 0, 0),  # SLEEP_STATUS_REG
        struct.pack("<Q", 0),  # hypervisor vendor identity
    ])
    t = sdt(b"FACP", FADT_REVISION, body)
    assert len(t) == FADT_LENGTH, len(t)
    return t


@dataclass(frozen=True)
class IsaOverride:
    source: int
    gsi: int
    flags: int


SCI_OVERRIDE = IsaOverride(L.SCI_IRQ, L.SCI_IRQ, MPS_ACTIVE_HIGH | MPS_LEVEL)
"""Without it Linux treats the SCI as level/active-low (the ACPI default); PmDevice drives it high."""
PIT_ON_PIN2_OVERRIDE = IsaOverride(0, 2, MPS_INTI_CONFORMS)
"""The PC convention (QEMU emits it) - but QEMU also rewrites KVM's GSI routing so GSI 0 reaches
IOAPIC pin 2. KVM's *default* routing sends the in-kernel PIT (GSI 0) to IOAPIC pin 0, so hvlab
omits this override unless the VMM installs QEMU-style routing."""
DEFAULT_OVERRIDES = (SCI_OVERRIDE,)


def madt(apic_ids: Sequence[int], ioapic_id: int = 0, overrides: Sequence[IsaOverride] = DEFAULT_OVERRIDES) -> bytes:
    """MADT ("APIC"): a LAPIC per vCPU, the IOAPIC at GSI 0, ISA overrides, LINT1 = NMI.

    ISA IRQs without an override are identity-mapped to IOAPIC pins (edge, active high), which is
    what KVM's default GSI routing implements; keep those routes when replacing the routing table.
    """
    if not apic_ids or max(apic_ids) > 254 or len(apic_ids) > 255:
        raise ValueError("MADT: 1-255 vCPUs with xAPIC ids below 255 (x2APIC entries not implemented)")
    body = bytearray(struct.pack("<II", L.LAPIC_ADDR, MADT_PCAT_COMPAT))
    for uid, apic_id in enumerate(apic_ids):
        body += struct.pack("<BBBBI", 0, 8, uid, apic_id, 1)  # Processor Local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, ioapic_id, 0, L.IOAPIC_ADDR, 0)
    for o in overrides:
        body += struct.pack("<BBBBIH", 2, 10, 0, o.source, o.gsi, o.flags)
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)  # Local APIC NMI: all processors, LINT1
    return sdt(b"APIC", MADT_REVISION, bytes(body))


@dataclass(frozen=True)
class Uart:
    name: str
    port: int
    irq: int
    uid: int


DEFAULT_UARTS = (Uart("COM1", L.COM1_PORT, L.COM1_IRQ, 1), Uart("COM2", L.COM2_PORT, L.COM2_IRQ, 2))


def dsdt_body(
    uarts: Sequence[Uart] = DEFAULT_UARTS,
    vmbus_low: tuple[int, int] = (L.VMBUS_LOW_MMIO_START, L.VMBUS_LOW_MMIO_END),
    vmbus_high: tuple[int, int] | None = (L.VMBUS_HIGH_MMIO_START, L.VMBUS_HIGH_MMIO_END),
) -> bytes:
    """The DSDT's AML: VMBus (as Hyper-V Gen2 has it), the UARTs, the RTC and \\_S5."""
    sta_present = aml.name("_STA", aml.integer(0x0F))
    windows = [aml.dword_memory(*vmbus_low)]
    if vmbus_high:
        windows.append(aml.qword_memory(*vmbus_high))
    vmbs = aml.device(
        "VMBS",
        aml.name("_HID", aml.string("VMBus")),
        aml.name("_UID", aml.integer(0)),
        aml.name("_DDN", aml.string("VMBUS")),
        aml.method("_STA", aml.return_(aml.integer(0x0F))),
    )
    vmod = aml.device(
        "VMOD",
        aml.name("_HID", aml.string("ACPI0004")),
        aml.name("_UID", aml.integer(0)),
        sta_present,
        aml.name("_CRS", aml.resource_template(*windows)),
        vmbs,
    )
    devices = [vmod]
    for u in uarts:
        devices.append(aml.device(
            u.name,
            aml.name("_HID", aml.eisaid("PNP0501")),
            aml.name("_UID", aml.integer(u.uid)),
            sta_present,
            aml.name("_CRS", aml.resource_template(aml.io(u.port, u.port, 0, 8), aml.irq_noflags(u.irq))),
        ))
    devices.append(aml.device(
        "RTC",
        aml.name("_HID", aml.eisaid("PNP0B00")),
        sta_present,
        aml.name("_CRS", aml.resource_template(
            aml.io(L.CMOS_INDEX_PORT, L.CMOS_INDEX_PORT, 1, 2), aml.irq_noflags(L.CMOS_IRQ))),
    ))
    s5 = aml.name("\\_S5", aml.package(*(aml.integer(v) for v in (L.S5_SLP_TYP, L.S5_SLP_TYP, 0, 0))))
    return aml.scope("\\_SB", *devices) + s5


def dsdt(body: bytes | None = None) -> bytes:
    """DSDT revision 2 (64-bit AML integers)."""
    return sdt(b"DSDT", 2, dsdt_body() if body is None else body)


@dataclass
class AcpiTables:
    """The tables laid out for guest address ``base``: copy :attr:`blob` there."""

    base: int
    blob: bytes
    addresses: dict[str, int] = field(default_factory=dict)
    """Signature -> guest-physical address ("RSDP", "XSDT", "FACP", "FACS", "DSDT", "APIC")."""

    @property
    def rsdp_addr(self) -> int:
        return self.addresses["RSDP"]


def build_acpi_tables(
    n_cpus: int = 1,
    base: int = L.ACPI_TABLES_ADDR,
    apic_ids: Sequence[int] | None = None,
    dsdt_aml: bytes | None = None,
    max_size: int = L.ACPI_TABLES_MAX,
    overrides: Sequence[IsaOverride] = DEFAULT_OVERRIDES,
) -> AcpiTables:
    """Build all tables into one blob for ``base`` (16-byte aligned; RSDP first).

    ``apic_ids`` defaults to 0..n_cpus-1, which must match the vCPU ids (and the APIC ids the VMM
    patches into CPUID, or Linux reports "APIC ID mismatch").
    """
    if base % 16:
        raise ValueError("ACPI base must be 16-byte aligned (the RSDP scan steps by 16)")
    ids = list(range(n_cpus)) if apic_ids is None else list(apic_ids)
    if len(ids) != n_cpus:
        raise ValueError("apic_ids must have one entry per vCPU")
    blob = bytearray()
    addrs: dict[str, int] = {}

    def put(sig: str, data: bytes, align: int = 16) -> int:
        blob.extend(bytes(-len(blob) % align))
        addrs[sig] = base + len(blob)
        blob.extend(data)
        return addrs[sig]

    # Fixed order; the RSDP is patched once the XSDT address is known.
    put("RSDP", bytes(36))
    facs_addr = put("FACS", facs(), 64)
    dsdt_addr = put("DSDT", dsdt(dsdt_aml))
    fadt_addr = put("FACP", fadt(dsdt_addr, facs_addr))
    madt_addr = put("APIC", madt(ids, overrides=overrides))
    xsdt_addr = put("XSDT", xsdt([fadt_addr, madt_addr]))
    blob[0:36] = rsdp(xsdt_addr)
    if len(blob) > max_size:
        raise ValueError(f"ACPI tables ({len(blob)} bytes) exceed the {max_size} bytes reserved")
    return AcpiTables(base=base, blob=bytes(blob), addresses=addrs)


# ------------------------------------------------------------------ parsing back (tests, debugging)

@dataclass(frozen=True)
class TableHeader:
    signature: bytes
    length: int
    revision: int
    checksum: int
    oem_id: bytes
    oem_table_id: bytes


def parse_header(data: bytes) -> TableHeader:
    sig, length, rev, csum, oem, oem_tid, _orev, _cid, _crev = struct.unpack_from(HEADER_FMT, data)
    return TableHeader(sig, length, rev, csum, oem, oem_tid)


def parse_tables(blob: bytes, base: int) -> dict[str, bytes]:
    """Follow RSDP -> XSDT -> (FADT -> DSDT, FACS), (MADT) in ``blob`` mapped at ``base``.

    Returns signature -> table bytes; raises ValueError on a bad signature, length or checksum.
    """

    def at(addr: int, n: int) -> bytes:
        off = addr - base
        if off < 0 or off + n > len(blob):
            raise ValueError(f"table at {addr:#x} lies outside the blob")
        return blob[off : off + n]

    def table(addr: int) -> bytes:
        hdr = parse_header(at(addr, HEADER_SIZE))
        t = at(addr, hdr.length)
        if sum(t) & 0xFF:
            raise ValueError(f"{hdr.signature!r} checksum is wrong")
        return t

    r = at(base, 36)
    if r[:8] != b"RSD PTR " or sum(r[:20]) & 0xFF or sum(r) & 0xFF:
        raise ValueError("bad RSDP signature or checksum")
    xsdt_addr = struct.unpack_from("<Q", r, 24)[0]
    out = {"RSDP": r, "XSDT": table(xsdt_addr)}
    x = out["XSDT"]
    for (addr,) in struct.iter_unpack("<Q", x[HEADER_SIZE:]):
        t = table(addr)
        out[t[:4].decode()] = t
    f = out["FACP"]
    facs_addr, dsdt32 = struct.unpack_from("<II", f, 36)
    x_dsdt = struct.unpack_from("<Q", f, 140)[0]
    out["DSDT"] = table(x_dsdt or dsdt32)
    if facs_addr:
        fa = at(facs_addr, 64)
        if fa[:4] != b"FACS":
            raise ValueError("bad FACS")
        out["FACS"] = fa
    return out

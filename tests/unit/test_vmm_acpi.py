"""ACPI tables: structure, checksums, the fields Linux relies on, and (when installed) iasl's view."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from hvlab.vmm import acpi
from hvlab.vmm import layout as L


@pytest.fixture(scope="module")
def tables() -> dict[str, bytes]:
    t = acpi.build_acpi_tables(n_cpus=3)
    return acpi.parse_tables(t.blob, t.base)


def test_all_tables_present_with_valid_checksums(tables: dict[str, bytes]) -> None:
    assert set(tables) == {"RSDP", "XSDT", "FACP", "APIC", "DSDT", "FACS"}
    for sig, t in tables.items():
        if sig in ("RSDP", "FACS"):
            continue
        h = acpi.parse_header(t)
        assert h.signature == sig.encode() and h.length == len(t)
        assert sum(t) % 256 == 0
        assert h.oem_id == b"HVLAB "


def test_rsdp(tables: dict[str, bytes]) -> None:
    r = tables["RSDP"]
    assert len(r) == 36 and r[:8] == b"RSD PTR "
    assert r[15] == 2  # revision 2: XSDT
    assert sum(r[:20]) % 256 == 0 and sum(r) % 256 == 0
    assert struct.unpack_from("<I", r, 20)[0] == 36


def test_rsdp_is_where_linux_scans() -> None:
    t = acpi.build_acpi_tables()
    assert t.rsdp_addr % 16 == 0 and L.BIOS_AREA_START <= t.rsdp_addr < L.BIOS_AREA_END
    assert t.base + len(t.blob) <= L.BIOS_AREA_END
    assert t.addresses["FACS"] % 64 == 0


def test_fadt_is_full_acpi_with_pm_blocks_reset_and_sci(tables: dict[str, bytes]) -> None:
    f = tables["FACP"]
    assert len(f) == 276 and f[8] == 6
    flags = struct.unpack_from("<I", f, 112)[0]
    assert not flags & acpi.FADT_HW_REDUCED_ACPI
    assert flags & acpi.FADT_RESET_REG_SUP and flags & acpi.FADT_TMR_VAL_EXT
    assert not flags & acpi.FADT_PWR_BUTTON  # fixed power button present
    assert struct.unpack_from("<H", f, 46)[0] == L.SCI_IRQ
    assert struct.unpack_from("<I", f, 48)[0] == 0  # no SMI_CMD: always in ACPI mode
    pm1a_evt, _, pm1a_cnt, _, _, pm_tmr = struct.unpack_from("<6I", f, 56)
    assert (pm1a_evt, pm1a_cnt, pm_tmr) == (L.PM1A_EVT_PORT, L.PM1A_CNT_PORT, L.PM_TMR_PORT)
    assert tuple(f[88:92]) == (4, 2, 0, 4)
    assert f[108] == L.CMOS_CENTURY_REG
    boot_arch = struct.unpack_from("<H", f, 109)[0]
    assert not boot_arch & acpi.BOOT_ARCH_8042 and not boot_arch & acpi.BOOT_ARCH_CMOS_RTC_NOT_PRESENT
    space, width, _off, _acc, addr = struct.unpack_from("<BBBBQ", f, 116)
    assert (space, width, addr, f[128]) == (acpi.GAS_SYSTEM_IO, 8, L.RESET_PORT, L.RESET_VALUE)
    # X_ blocks agree with the 32-bit ones (ACPICA warns on mismatches)
    for off, port, length in ((148, L.PM1A_EVT_PORT, 4), (172, L.PM1A_CNT_PORT, 2), (208, L.PM_TMR_PORT, 4)):
        space, width, _o, _a, addr = struct.unpack_from("<BBBBQ", f, off)
        assert (space, width, addr) == (acpi.GAS_SYSTEM_IO, length * 8, port)
    facs32, dsdt32 = struct.unpack_from("<II", f, 36)
    assert struct.unpack_from("<Q", f, 140)[0] == dsdt32
    assert facs32 and struct.unpack_from("<Q", f, 132)[0] == 0


def test_madt(tables: dict[str, bytes]) -> None:
    m = tables["APIC"]
    lapic, flags = struct.unpack_from("<II", m, 36)
    assert lapic == L.LAPIC_ADDR and flags & acpi.MADT_PCAT_COMPAT
    i = 44
    entries: dict[int, list[bytes]] = {}
    while i < len(m):
        typ, ln = m[i], m[i + 1]
        entries.setdefault(typ, []).append(m[i : i + ln])
        i += ln
    assert i == len(m)
    assert [struct.unpack("<BBBBI", e)[2:] for e in entries[0]] == [(0, 0, 1), (1, 1, 1), (2, 2, 1)]
    (io,) = entries[1]
    assert struct.unpack("<BBBBII", io)[4:] == (L.IOAPIC_ADDR, 0)
    isos = {struct.unpack("<BBBBIH", e)[3]: struct.unpack("<BBBBIH", e)[4:] for e in entries[2]}
    # IRQ0 stays identity-mapped: KVM's default routing sends the in-kernel PIT to IOAPIC pin 0
    assert set(isos) == {L.SCI_IRQ}
    assert isos[L.SCI_IRQ] == (L.SCI_IRQ, acpi.MPS_ACTIVE_HIGH | acpi.MPS_LEVEL)
    assert entries[4] == [struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)]


def test_madt_custom_apic_ids_and_limits() -> None:
    t = acpi.build_acpi_tables(n_cpus=2, apic_ids=[0, 2])
    m = acpi.parse_tables(t.blob, t.base)["APIC"]
    assert struct.unpack_from("<BBBBI", m, 44 + 8)[3] == 2
    with pytest.raises(ValueError):
        acpi.build_acpi_tables(n_cpus=2, apic_ids=[0])
    with pytest.raises(ValueError):
        acpi.madt([255])


def test_madt_pit_override_on_request() -> None:
    t = acpi.build_acpi_tables(overrides=(acpi.PIT_ON_PIN2_OVERRIDE, acpi.SCI_OVERRIDE))
    m = acpi.parse_tables(t.blob, t.base)["APIC"]
    assert struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0) in m


def test_facs(tables: dict[str, bytes]) -> None:
    fa = tables["FACS"]
    assert fa[:4] == b"FACS" and struct.unpack_from("<I", fa, 4)[0] == 64 and fa[32] == 2


def test_parse_tables_detects_corruption() -> None:
    t = acpi.build_acpi_tables()
    blob = bytearray(t.blob)
    off = t.addresses["APIC"] - t.base + 40
    blob[off] ^= 0xFF
    with pytest.raises(ValueError, match="checksum"):
        acpi.parse_tables(bytes(blob), t.base)
    with pytest.raises(ValueError, match="RSDP"):
        acpi.parse_tables(bytes(8) + t.blob[8:], t.base)


def test_base_alignment_and_size_limit() -> None:
    with pytest.raises(ValueError):
        acpi.build_acpi_tables(base=0xE0008)
    with pytest.raises(ValueError):
        acpi.build_acpi_tables(max_size=256)


def test_tables_at_another_base() -> None:
    t = acpi.build_acpi_tables(base=0x10_0000)
    assert acpi.parse_tables(t.blob, 0x10_0000)["DSDT"][:4] == b"DSDT"


IASL = shutil.which("iasl")


@pytest.mark.skipif(IASL is None, reason="iasl (Debian acpica-tools) not installed")
def test_iasl_disassembles_dsdt(tmp_path: Path, tables: dict[str, bytes]) -> None:
    for sig in ("DSDT", "FACP", "APIC"):
        (tmp_path / f"{sig.lower()}.dat").write_bytes(tables[sig])
        r = subprocess.run([IASL, "-d", f"{sig.lower()}.dat"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    for needle in ('Device (VMOD)', '"ACPI0004"', 'Device (VMBS)', 'Name (_HID, "VMBus")',
                   "DWordMemory (ResourceProducer", "0xE0000000", "0xEFFFFFFF",
                   "QWordMemory (ResourceProducer", "0x0000000F00000000", "0x0000000F3FFFFFFF",
                   'Device (COM1)', 'EisaId ("PNP0501")', "0x03F8", "{4}", 'Device (COM2)', "{3}",
                   'EisaId ("PNP0B00")', "Name (\\_S5, Package (0x04)"):
        assert needle in dsl, needle
    facp = (tmp_path / "facp.dsl").read_text()
    assert "Hardware Reduced (V5) : 0" in facp
    assert "Reset Register Supported (V2) : 1" in facp
    apic = (tmp_path / "apic.dsl").read_text()
    assert apic.count("Processor Local APIC") == 3
    assert "I/O APIC" in apic
    for out in (dsl, facp, apic):
        assert "Error" not in out and "Invalid" not in out


ACPIEXEC = shutil.which("acpiexec")


@pytest.mark.skipif(ACPIEXEC is None, reason="acpiexec (Debian acpica-tools) not installed")
def test_acpica_loads_tables_and_evaluates_vmbus(tmp_path: Path, tables: dict[str, bytes]) -> None:
    """ACPICA (the interpreter inside Linux) loads our FADT+DSDT+MADT and evaluates the objects
    hv_vmbus and the serial driver use. Its own self-tests of PM2/GPE blocks fail by design (we
    declare none), so only ACPICA's error and warning lines are checked."""
    files = []
    for sig in ("FACP", "DSDT", "APIC"):
        p = tmp_path / f"{sig.lower()}.aml"
        p.write_bytes(tables[sig])
        files.append(str(p))
    cmds = "evaluate \\_SB.VMOD.VMBS._HID; evaluate \\_SB.VMOD.VMBS._STA; evaluate \\_SB.VMOD._CRS; evaluate \\_S5"
    r = subprocess.run([ACPIEXEC, "-b", cmds, *files], capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert '[String] Length 05 = "VMBUS"' in out  # ACPICA upper-cases _HID strings
    assert "[Integer] = 000000000000000F" in out
    assert "[Buffer] Length 4A" in out  # ADDRESS32 (26) + ADDRESS64 (46) + end tag (2)
    assert "Contains 4 Elements" in out
    bad = [ln for ln in out.splitlines() if "ACPI Error" in ln or "ACPI Warning" in ln or "Firmware Error" in ln]
    assert bad == []

"""AML encoder: exact bytes for hand-computed constructs, and a small decoder that reads the DSDT back."""

from __future__ import annotations

import struct

import pytest

from hvlab.vmm import aml

# ---------------------------------------------------------------- a test-side AML decoder


def dec_pkg_length(b: bytes, i: int) -> tuple[int, int]:
    """Returns (PkgLength value, index after the PkgLength bytes)."""
    lead = b[i]
    n = lead >> 6
    if n == 0:
        return lead & 0x3F, i + 1
    v = lead & 0x0F
    for k in range(n):
        v |= b[i + 1 + k] << (4 + 8 * k)
    return v, i + 1 + n


def dec_name(b: bytes, i: int) -> tuple[str, int]:
    prefix = ""
    while b[i] in (0x5C, 0x5E):
        prefix += chr(b[i])
        i += 1
    if b[i] == 0x00:
        return prefix, i + 1
    if b[i] == 0x2E:
        segs, i = [b[i + 1 : i + 5], b[i + 5 : i + 9]], i + 9
    elif b[i] == 0x2F:
        n = b[i + 1]
        segs = [b[i + 2 + 4 * k : i + 6 + 4 * k] for k in range(n)]
        i += 2 + 4 * n
    else:
        segs, i = [b[i : i + 4]], i + 4
    return prefix + ".".join(s.decode() for s in segs), i


def dec_data(b: bytes, i: int):  # noqa: ANN201 - returns any decoded object
    op = b[i]
    if op == 0x00:
        return 0, i + 1
    if op == 0x01:
        return 1, i + 1
    if op == 0xFF:
        return (1 << 64) - 1, i + 1
    sizes = {0x0A: ("<B", 1), 0x0B: ("<H", 2), 0x0C: ("<I", 4), 0x0E: ("<Q", 8)}
    if op in sizes:
        fmt, n = sizes[op]
        return struct.unpack_from(fmt, b, i + 1)[0], i + 1 + n
    if op == 0x0D:
        end = b.index(0, i + 1)
        return b[i + 1 : end].decode(), end + 1
    if op == 0x11:
        length, j = dec_pkg_length(b, i + 1)
        end = i + 1 + length
        size, j = dec_data(b, j)
        data = b[j:end]
        assert len(data) == size
        return ("Buffer", data), end
    if op == 0x12:
        length, j = dec_pkg_length(b, i + 1)
        end = i + 1 + length
        count = b[j]
        j += 1
        elems = []
        while j < end:
            e, j = dec_data(b, j)
            elems.append(e)
        assert len(elems) == count
        return ("Package", elems), end
    raise AssertionError(f"unknown data opcode {op:#x} at {i}")


def dec_terms(b: bytes, i: int, end: int) -> list:
    out = []
    while i < end:
        op = b[i]
        if op == 0x10 or (op == 0x5B and b[i + 1] == 0x82):
            start = i + (1 if op == 0x10 else 2)
            length, j = dec_pkg_length(b, start)
            name, j = dec_name(b, j)
            stop = start + length
            out.append(("Scope" if op == 0x10 else "Device", name, dec_terms(b, j, stop)))
            i = stop
        elif op == 0x08:
            name, j = dec_name(b, i + 1)
            val, i = dec_data(b, j)
            out.append(("Name", name, val))
        elif op == 0x14:
            length, j = dec_pkg_length(b, i + 1)
            stop = i + 1 + length
            name, j = dec_name(b, j)
            flags = b[j]
            out.append(("Method", name, flags, dec_terms(b, j + 1, stop)))
            i = stop
        elif op == 0xA4:
            val, i = dec_data(b, i + 1)
            out.append(("Return", val))
        else:
            raise AssertionError(f"unknown term opcode {op:#x} at {i}")
    assert i == end, "a term ran past its package"
    return out


def dec_resources(buf: bytes) -> list[tuple]:
    """Decode a resource template buffer into (kind, fields...) tuples; checks the end tag."""
    out = []
    i = 0
    while True:
        tag = buf[i]
        if tag & 0x80:
            length = struct.unpack_from("<H", buf, i + 1)[0]
            body = buf[i + 3 : i + 3 + length]
            if tag == 0x87:
                rtype, gflags, tflags, gran, mn, mx, tra, ln = struct.unpack("<BBBIIIII", body)
                out.append(("DWordMemory", mn, mx, ln, rtype, gflags))
            elif tag == 0x8A:
                rtype, gflags, tflags, gran, mn, mx, tra, ln = struct.unpack("<BBBQQQQQ", body)
                out.append(("QWordMemory", mn, mx, ln, rtype, gflags))
            else:
                out.append(("large", tag, body))
            i += 3 + length
        else:
            kind, length = (tag >> 3) & 0xF, tag & 7
            body = buf[i + 1 : i + 1 + length]
            i += 1 + length
            if kind == 0xF:
                assert i == len(buf), "bytes after the end tag"
                return out
            if kind == 0x8:
                _dec, mn, mx, al, ln = struct.unpack("<BHHBB", body)
                out.append(("IO", mn, mx, al, ln))
            elif kind == 0x4:
                mask = struct.unpack_from("<H", body)[0]
                out.append(("IRQ", [n for n in range(16) if mask >> n & 1]))
            else:
                out.append(("small", kind, body))


# ---------------------------------------------------------------- exact encodings


@pytest.mark.parametrize(
    ("body_len", "expected"),
    [
        (0, b"\x01"),
        (62, b"\x3f"),
        (63, b"\x41\x04"),  # 63+2 = 65 = 0x41
        (0xFFD, b"\x4f\xff"),  # total 0xFFF: largest 2-byte
        (0xFFE, b"\x81\x00\x01"),  # total 0x1001 in 3 bytes
        (0xFFFFC, b"\x8f\xff\xff"),  # total 0xFFFFF: largest 3-byte
        (0xFFFFD, b"\xc1\x00\x00\x01"),  # total 0x100001 in 4 bytes
    ],
)
def test_pkg_length_boundaries(body_len: int, expected: bytes) -> None:
    enc = aml.pkg_length(body_len)
    assert enc == expected
    value, after = dec_pkg_length(enc, 0)
    assert value == body_len + len(enc) and after == len(enc)


def test_pkg_length_round_trip_and_limit() -> None:
    for n in list(range(0, 300)) + [4000, 4093, 4094, 70000, 1 << 20, (1 << 28) - 5]:
        enc = aml.pkg_length(n)
        assert dec_pkg_length(enc, 0)[0] == n + len(enc)
    with pytest.raises(ValueError):
        aml.pkg_length(1 << 28)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (2, b"\x0a\x02"),
        (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"),
        (0xFFFF, b"\x0b\xff\xff"),
        (0x10000, b"\x0c\x00\x00\x01\x00"),
        (0xE0000000, b"\x0c\x00\x00\x00\xe0"),
        (0x1_0000_0000, b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"),
        ((1 << 64) - 1, b"\xff"),
    ],
)
def test_integer_smallest_prefix(value: int, expected: bytes) -> None:
    assert aml.integer(value) == expected


def test_integer_range() -> None:
    with pytest.raises(ValueError):
        aml.integer(-1)
    with pytest.raises(ValueError):
        aml.integer(1 << 64)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("\\_SB", b"\\_SB_"),
        ("_SB.PCI0", b"\x2e_SB_PCI0"),
        ("\\_SB.VMOD.VMBS", b"\\\x2f\x03_SB_VMODVMBS"),
        ("^FOO", b"^FOO_"),
        ("^^AB.CD", b"^^\x2eAB__CD__"),
        ("\\", b"\\\x00"),
        ("RTC", b"RTC_"),
    ],
)
def test_name_string(path: str, expected: bytes) -> None:
    assert aml.name_string(path) == expected
    assert dec_name(expected, 0)[0].replace("_", "") == path.replace("_", "")


@pytest.mark.parametrize("bad", ["TOOLONG", "1ABC", "ab", "A-B"])
def test_bad_name_segment(bad: str) -> None:
    with pytest.raises(ValueError):
        aml.name_string(bad)


def test_eisaid_and_hid_name() -> None:
    # EISAID("PNP0501") = 0x0105D041, as iasl compiles it
    assert aml.eisaid("PNP0501") == b"\x0c\x41\xd0\x05\x01"
    assert aml.eisaid("PNP0B00") == b"\x0c\x41\xd0\x0b\x00"
    assert aml.name("_HID", aml.eisaid("PNP0501")) == b"\x08_HID\x0c\x41\xd0\x05\x01"
    assert aml.name("_HID", aml.string("VMBus")) == b"\x08_HID\x0dVMBus\x00"


def test_string_rejects_non_ascii() -> None:
    with pytest.raises(ValueError):
        aml.string("é")


def test_device_and_method_bytes() -> None:
    # Device (VMBS) { Method (_STA) { Return (0x0F) } }, hand-assembled:
    method = b"\x14\x09_STA\x00\xa4\x0a\x0f"  # PkgLength 9 = 1 + 4 + 1 + 3
    assert aml.method("_STA", aml.return_(aml.integer(0x0F))) == method
    dev = aml.device("VMBS", method)
    assert dev == b"\x5b\x82" + bytes([1 + 4 + len(method)]) + b"VMBS" + method


def test_package_and_buffer() -> None:
    assert aml.package(aml.integer(5), aml.integer(5), aml.integer(0), aml.integer(0)) == (
        b"\x12\x08\x04\x0a\x05\x0a\x05\x00\x00"
    )
    assert aml.buffer(b"\x79\x00") == b"\x11\x05\x0a\x02\x79\x00"
    big = aml.buffer(bytes(100))
    assert dec_data(big, 0) == (("Buffer", bytes(100)), len(big))


def test_resource_descriptor_bytes() -> None:
    assert aml.io(0x3F8, 0x3F8, 0, 8) == b"\x47\x01\xf8\x03\xf8\x03\x00\x08"
    assert aml.irq_noflags(4) == b"\x22\x10\x00"
    assert aml.irq(5, level=True, active_low=True, shared=True) == b"\x23\x20\x00\x18"
    assert aml.irq(5) == b"\x23\x20\x00\x01"
    dw = aml.dword_memory(0xE0000000, 0xEFFFFFFF)
    assert dw[:3] == b"\x87\x17\x00" and len(dw) == 3 + 0x17
    # type 0 (memory), producer + MinFixed + MaxFixed, ReadWrite, granularity 0
    assert dw[3:10] == b"\x00\x0c\x01\x00\x00\x00\x00"
    qw = aml.qword_memory(0xF_0000_0000, 0xF_3FFF_FFFF)
    assert qw[:3] == b"\x8a\x2b\x00" and len(qw) == 3 + 0x2B
    assert aml.memory32_fixed(0xFEC00000, 0x1000) == b"\x86\x09\x00\x01\x00\x00\xc0\xfe\x00\x10\x00\x00"
    rt = aml.resource_template(aml.io(0x70, 0x70, 1, 2), aml.irq_noflags(8), dw, qw)
    (kind, buf), _ = dec_data(rt, 0)
    assert kind == "Buffer"
    assert dec_resources(buf) == [
        ("IO", 0x70, 0x70, 1, 2),
        ("IRQ", [8]),
        ("DWordMemory", 0xE0000000, 0xEFFFFFFF, 0x10000000, 0, 0x0C),
        ("QWordMemory", 0xF_0000_0000, 0xF_3FFF_FFFF, 0x4000_0000, 0, 0x0C),
    ]


def test_bad_ranges() -> None:
    with pytest.raises(ValueError):
        aml.dword_memory(2, 1)
    with pytest.raises(ValueError):
        aml.dword_memory(0, 1 << 32)
    with pytest.raises(ValueError):
        aml.irq_noflags(16)


def test_large_scope_uses_multibyte_pkglength() -> None:
    names = [aml.name(f"N{i:03d}", aml.integer(i)) for i in range(200)]
    s = aml.scope("\\_SB", *names)
    tree = dec_terms(s, 0, len(s))
    assert tree[0][0] == "Scope" and tree[0][1] == "\\_SB_"
    assert [t[2] for t in tree[0][2]] == list(range(200))


# ---------------------------------------------------------------- the real DSDT, decoded


def _find(terms: list, kind: str, name: str):  # noqa: ANN202
    for t in terms:
        if t[0] == kind and t[1].rstrip("_") == name.rstrip("_"):
            return t
    raise AssertionError(f"{kind} {name} not found in {[t[:2] for t in terms]}")


def _names(terms: list) -> dict:
    return {t[1].rstrip("_"): t[2] for t in terms if t[0] == "Name"}


def test_dsdt_decodes_to_vmbus_uarts_rtc_s5() -> None:
    from hvlab.vmm import acpi
    from hvlab.vmm import layout as L

    body = acpi.dsdt_body()
    tree = dec_terms(body, 0, len(body))
    sb = _find(tree, "Scope", "\\_SB")
    vmod = _find(sb[2], "Device", "VMOD")
    n = _names(vmod[2])
    assert n["_HID"] == "ACPI0004" and n["_STA"] == 0x0F
    kind, crs = n["_CRS"]
    assert kind == "Buffer"
    assert dec_resources(crs) == [
        ("DWordMemory", L.VMBUS_LOW_MMIO_START, L.VMBUS_LOW_MMIO_END, 0x10000000, 0, 0x0C),
        ("QWordMemory", L.VMBUS_HIGH_MMIO_START, L.VMBUS_HIGH_MMIO_END, 0x4000_0000, 0, 0x0C),
    ]
    vmbs = _find(vmod[2], "Device", "VMBS")
    vn = _names(vmbs[2])
    assert vn["_HID"].upper() == "VMBUS"
    sta = _find(vmbs[2], "Method", "_STA")
    assert sta[3] == [("Return", 0x0F)]
    for com, port, irq in (("COM1", 0x3F8, 4), ("COM2", 0x2F8, 3)):
        cn = _names(_find(sb[2], "Device", com)[2])
        assert cn["_HID"] == 0x0105D041  # EISAID PNP0501
        assert dec_resources(cn["_CRS"][1]) == [("IO", port, port, 0, 8), ("IRQ", [irq])]
    rn = _names(_find(sb[2], "Device", "RTC")[2])
    assert dec_resources(rn["_CRS"][1]) == [("IO", 0x70, 0x70, 1, 2), ("IRQ", [8])]
    s5 = _find(tree, "Name", "\\_S5")
    assert s5[2] == ("Package", [L.S5_SLP_TYP, L.S5_SLP_TYP, 0, 0])


def test_vmbus_windows_avoid_platform_devices() -> None:
    """hv_vmbus's rule (HOST_CONTRACT 1.6): windows ending below 1 MiB are ignored, and one that
    straddles the vTPM base would be truncated; ours must do neither and miss IOAPIC/HPET/LAPIC."""
    from hvlab.vmm import layout as L

    lo, hi = L.VMBUS_LOW_MMIO_START, L.VMBUS_LOW_MMIO_END
    assert hi - lo + 1 >= 128 * L.MiB
    for dev in (L.IOAPIC_ADDR, L.HPET_ADDR, L.VTPM_ADDR, L.LAPIC_ADDR, L.KVM_TSS_ADDR):
        assert not lo <= dev <= hi
    assert hi < L.VTPM_ADDR and lo >= L.MMIO_HOLE_START
    assert L.VMBUS_HIGH_MMIO_START >= L.FOUR_GIB

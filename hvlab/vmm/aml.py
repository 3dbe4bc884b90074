"""A small AML (ACPI Machine Language) encoder: just what hvlab's DSDT needs.

Every function returns the encoded bytes of one term, so a DSDT body reads like the ASL it
stands for::

    scope("\\_SB", device("COM1", name("_HID", eisaid("PNP0501")), name("_CRS", resource_template(
        io(0x3F8, 0x3F8, 1, 8), irq_noflags(4)))))

Encodings follow ACPI 6.5 chapter 20 (AML) and 6.4 (resource descriptors). The tests check exact
bytes for hand-computed cases and disassemble the whole DSDT with iasl when it is installed.
"""

from __future__ import annotations

import struct

# opcodes (ACPI 6.5, 20.3)
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C  # '\'
PARENT_PREFIX_CHAR = 0x5E  # '^'
RETURN_OP = 0xA4
ONES_OP = 0xFF

PKG_LENGTH_MAX = 0x0FFFFFFF


def pkg_length(body_len: int) -> bytes:
    """PkgLength for a body of ``body_len`` bytes; the encoded length counts its own bytes.

    One byte holds lengths up to 63 (bits 0-5). Longer ones use 2-4 bytes: byte 0 carries the
    count of following bytes in bits 6-7 and the low nibble of the length in bits 0-3; the
    following bytes carry the rest, 8 bits each.
    """
    if body_len + 1 <= 0x3F:
        return bytes([body_len + 1])
    for extra, limit in ((1, 0xFFF), (2, 0xFFFFF), (3, PKG_LENGTH_MAX)):
        total = body_len + 1 + extra
        if total <= limit:
            out = [(extra << 6) | (total & 0x0F)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(out)
    raise ValueError(f"AML package body of {body_len} bytes is too long")


def _nameseg(seg: str) -> bytes:
    if not 1 <= len(seg) <= 4:
        raise ValueError(f"bad AML name segment {seg!r}")
    if not (seg[0].isupper() or seg[0] == "_") or not all(c.isupper() or c.isdigit() or c == "_" for c in seg):
        raise ValueError(f"bad AML name segment {seg!r}: use A-Z, 0-9, _ (not a digit first)")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """NameString: optional root ('\\') or parent ('^'...) prefix, then 0, 1, 2 or n segments."""
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = b"\\", rest[1:]
    else:
        while rest.startswith("^"):
            prefix += b"^"
            rest = rest[1:]
    segs = [s for s in rest.split(".")] if rest else []
    enc = [_nameseg(s) for s in segs]
    if not enc:
        return prefix + b"\x00"
    if len(enc) == 1:
        return prefix + enc[0]
    if len(enc) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + enc[0] + enc[1]
    if len(enc) > 255:
        raise ValueError("too many name segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(enc)]) + b"".join(enc)


def integer(v: int) -> bytes:
    """The shortest integer encoding: Zero/One/Ones opcodes, else Byte/Word/DWord/QWord consts."""
    if v < 0 or v > 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"AML integer {v} out of range")
    if v == 0:
        return bytes([ZERO_OP])
    if v == 1:
        return bytes([ONE_OP])
    if v == 0xFFFFFFFFFFFFFFFF:
        return bytes([ONES_OP])
    if v <= 0xFF:
        return bytes([BYTE_PREFIX, v])
    if v <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", v)
    if v <= 0xFFFFFFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", v)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", v)


def string(s: str) -> bytes:
    """String constant (ASCII, 0x01-0x7F, NUL-terminated)."""
    b = s.encode("ascii")
    if any(c == 0 or c > 0x7F for c in b):
        raise ValueError(f"AML string {s!r} must be 7-bit ASCII without NUL")
    return bytes([STRING_PREFIX]) + b + b"\x00"


def eisaid(pnp: str) -> bytes:
    """EISAID("PNP0501"): three letters (5 bits each) and four hex digits, as a DWord constant."""
    if len(pnp) != 7 or not pnp[:3].isalpha() or not pnp[:3].isupper():
        raise ValueError(f"bad EISA id {pnp!r}")
    c = [ord(ch) - 0x40 for ch in pnp[:3]]
    v = (c[0] << 10) | (c[1] << 5) | c[2]
    prod = int(pnp[3:], 16)
    raw = bytes([v >> 8, v & 0xFF, prod >> 8, prod & 0xFF])
    return integer(struct.unpack("<I", raw)[0])


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def package(*elements: bytes) -> bytes:
    """Package of already-encoded data objects (integers, strings, buffers, packages)."""
    if len(elements) > 255:
        raise ValueError("use VarPackage for more than 255 elements")
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def name(path: str, value: bytes) -> bytes:
    """Name(path, value) where value is an encoded data object."""
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def method(path: str, *terms: bytes, args: int = 0, serialized: bool = False, sync_level: int = 0) -> bytes:
    if not 0 <= args <= 7 or not 0 <= sync_level <= 15:
        raise ValueError("bad method flags")
    flags = args | (0x08 if serialized else 0) | (sync_level << 4)
    body = name_string(path) + bytes([flags]) + b"".join(terms)
    return bytes([METHOD_OP]) + pkg_length(len(body)) + body


def return_(value: bytes) -> bytes:
    return bytes([RETURN_OP]) + value


# ------------------------------------------------------------------ resource descriptors (6.4)

def io(minimum: int, maximum: int, alignment: int, length: int, decode16: bool = True) -> bytes:
    """IO(Decode16, min, max, align, len): small descriptor, tag 0x47 (type 8, length 7)."""
    return struct.pack("<BBHHBB", 0x47, 1 if decode16 else 0, minimum, maximum, alignment, length)


def irq_noflags(*irqs: int) -> bytes:
    """IRQNoFlags(){...}: edge-triggered, active-high, exclusive ISA IRQs (tag 0x22, length 2)."""
    return struct.pack("<BH", 0x22, _irq_mask(irqs))


def _irq_mask(irqs: tuple[int, ...]) -> int:
    mask = 0
    for i in irqs:
        if not 0 <= i <= 15:
            raise ValueError(f"ISA IRQ {i} out of range")
        mask |= 1 << i
    return mask


def irq(*irqs: int, level: bool = False, active_low: bool = False, shared: bool = False) -> bytes:
    """IRQ(Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared){...} (tag 0x23, length 3)."""
    flags = (0 if level else 1) | (0x08 if active_low else 0) | (0x10 if shared else 0)
    return struct.pack("<BHB", 0x23, _irq_mask(irqs), flags)


# general flags of address space descriptors
_ADDR_CONSUMER = 0x01
_ADDR_MIN_FIXED = 0x04
_ADDR_MAX_FIXED = 0x08
# memory type-specific flags
MEM_READ_WRITE = 0x01
MEM_CACHEABLE = 0x02
MEM_WRITE_COMBINING = 0x04
MEM_PREFETCHABLE = 0x06


def _address_general_flags(producer: bool) -> int:
    return (0 if producer else _ADDR_CONSUMER) | _ADDR_MIN_FIXED | _ADDR_MAX_FIXED


def dword_memory(minimum: int, maximum: int, *, producer: bool = True,
                 type_flags: int = MEM_READ_WRITE) -> bytes:
    """DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
    0, min, max, 0, len): large descriptor 0x87, ADDRESS32, 23 bytes of data.

    hv_vmbus reads only _MIN.._MAX of ADDRESS32/ADDRESS64 descriptors (HOST_CONTRACT 1.6).
    """
    if not 0 <= minimum <= maximum <= 0xFFFFFFFF:
        raise ValueError("bad 32-bit memory range")
    data = struct.pack("<BBBIIIII", 0, _address_general_flags(producer), type_flags,
                       0, minimum, maximum, 0, maximum - minimum + 1)
    return struct.pack("<BH", 0x87, len(data)) + data


def qword_memory(minimum: int, maximum: int, *, producer: bool = True,
                 type_flags: int = MEM_READ_WRITE) -> bytes:
    """QWordMemory(...): large descriptor 0x8A, ADDRESS64, 43 bytes of data."""
    if not 0 <= minimum <= maximum <= 0xFFFFFFFFFFFFFFFF:
        raise ValueError("bad 64-bit memory range")
    data = struct.pack("<BBBQQQQQ", 0, _address_general_flags(producer), type_flags,
                       0, minimum, maximum, 0, maximum - minimum + 1)
    return struct.pack("<BH", 0x8A, len(data)) + data


def memory32_fixed(base: int, length: int, read_write: bool = True) -> bytes:
    """Memory32Fixed(ReadWrite, base, length): large descriptor 0x86 (9 bytes of data)."""
    return struct.pack("<BHBII", 0x86, 9, 1 if read_write else 0, base, length)


END_TAG = bytes([0x79, 0x00])
"""End tag; checksum 0 means "the buffer is considered correct", as iasl emits."""


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate(){...}: a Buffer of descriptors closed by the end tag."""
    return buffer(b"".join(descriptors) + END_TAG)

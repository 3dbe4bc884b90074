"""The shared frame arithmetic against the textbook definitions."""

import random
import struct

from hvlab.net import frames


def folded_sum(data: bytes, start: int = 0) -> int:
    """RFC 1071 as written: add the 16-bit words, fold the carries."""
    if len(data) % 2:
        data += b"\0"
    total = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_ones_sum_matches_the_word_loop() -> None:
    rng = random.Random(7)
    cases = [b"", b"\0" * 6, b"\xff\xff", b"\xff\xff" * 3, b"\x01", b"\x00\x01\xff\xfe"]
    cases += [rng.randbytes(rng.randrange(1, 3000)) for _ in range(300)]
    for data in cases:
        for start in (0, 1, 0xFFFF, rng.randrange(0x10000)):
            assert frames.ones_sum(data, start) == folded_sum(data, start), (data[:8], start)
            assert frames.ones_sum(bytearray(data), start) == frames.ones_sum(memoryview(data), start)
    assert frames.inet_checksum(b"\0\0") == 0xFFFF and frames.inet_checksum(b"\xff\xff") == 0


def test_l3_header_looks_through_one_vlan_tag() -> None:
    plain = bytes(12) + b"\x08\x00" + bytes(20)
    tagged = frames.insert_vlan(plain, 5)
    assert frames.l3_header(plain) == (frames.ETH_P_IP, 14)
    assert frames.l3_header(tagged) == (frames.ETH_P_IP, 18)
    assert frames.l3_header(plain[:13]) is None and frames.l3_header(tagged[:16]) is None

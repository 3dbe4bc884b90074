"""VMBus ring buffers (spec/HOST_CONTRACT.md §2.9): layout, wrap-around, signalling, validation."""

from __future__ import annotations

import struct

import pytest

from hvlab.protocol import vmbus_packet as vp
from hvlab.vmbus.ring import (
    FEAT_PENDING_SEND_SZ,
    PagedView,
    RingBuffer,
    RingReader,
    RingViolation,
    RingWriter,
    SignalPolicy,
)

PAGE = 4096


def make_ring(data_pages: int = 1, channel: object = 7) -> tuple[bytearray, RingBuffer]:
    mem = bytearray(PAGE * (1 + data_pages))
    ring = RingBuffer(memoryview(mem), channel=channel)
    ring.init_header()
    return mem, ring


def pkt(n: int, tag: int = 0) -> bytes:
    """An in-band packet of exactly n bytes (n multiple of 8, ≥ 16)."""
    return vp.build_inband(bytes([tag & 0xFF]) * (n - 16), trans_id=tag)


def test_control_page_offsets() -> None:
    mem, ring = make_ring()
    assert struct.unpack_from("<I", mem, 64)[0] == FEAT_PENDING_SEND_SZ  # hv_ringbuffer_init
    ring.write_index, ring.read_index, ring.interrupt_mask, ring.pending_send_sz = 8, 16, 1, 40
    assert struct.unpack_from("<IIII", mem, 0) == (8, 16, 1, 40)
    struct.pack_into("<I", mem, 64, 0)
    assert ring.feature_bits == 0
    assert ring.data_size == PAGE
    with pytest.raises(ValueError):
        RingBuffer(bytearray(PAGE))  # no data area


def test_write_read_roundtrip_and_trailer() -> None:
    mem, ring = make_ring()
    w, r = RingWriter(ring), RingReader(ring)
    p = pkt(24, 5)
    assert w.write(p) == (True, True)  # empty → non-empty, mask 0: signal
    assert ring.write_index == 32
    assert bytes(mem[PAGE : PAGE + 24]) == p
    assert struct.unpack_from("<Q", mem, PAGE + 24)[0] == 0 << 32  # previous write index 0
    assert w.write(pkt(16, 6)) == (True, False)  # not empty before: no signal
    assert struct.unpack_from("<Q", mem, PAGE + 32 + 16)[0] == 32 << 32
    packets, signal = r.read_all()
    assert packets == [p, pkt(16, 6)] and not signal
    assert ring.read_index == ring.write_index == 56
    assert r.read() is None


def test_wrap_around_byte_wise() -> None:
    mem, ring = make_ring(1)
    w, r = RingWriter(ring), RingReader(ring)
    # Move both indices close to the end of the 4096-byte data area.
    first = pkt(4096 - 64 - 8)
    assert w.write(first).written
    assert r.read() == first and not r.commit()
    assert ring.read_index == ring.write_index == 4096 - 64
    big = pkt(112, 0x5A)  # 112 + 8 trailer from 4032: wraps 56 bytes into the start
    assert w.write(big) == (True, True)
    assert ring.write_index == (4096 - 64 + 120) % 4096 == 56
    assert bytes(mem[PAGE + 4032 : PAGE + 4096]) == big[:64]
    assert bytes(mem[PAGE : PAGE + 48]) == big[64:]
    assert struct.unpack_from("<Q", mem, PAGE + 48)[0] == 4032 << 32  # trailer after the wrap
    assert r.read() == big
    r.commit()
    # A trailer that itself wraps.
    _, ring2 = make_ring(1)
    w2, r2 = RingWriter(ring2), RingReader(ring2)
    assert w2.write(pkt(4096 - 32 - 8)).written and r2.read() is not None
    r2.commit()
    assert w2.write(pkt(32, 1)).written  # packet fills to the end, trailer at 0
    assert ring2.write_index == 8
    assert r2.read() == pkt(32, 1)


def test_ring_never_fills_completely() -> None:
    _, ring = make_ring(1)
    w, r = RingWriter(ring), RingReader(ring)
    assert w.write(pkt(4096 - 8 - 8)).written  # leaves 8 bytes free
    assert w.free_bytes() == 8
    assert w.write(pkt(16)) == (False, False)
    r.read()
    r.commit()
    # free == packet + trailer exactly is refused (free_bytes <= total).
    _, ring = make_ring(1)
    w = RingWriter(ring)
    assert w.write(pkt(16)).written  # 4072 free
    assert not w.write(pkt(4072 - 8)).written
    assert w.write(pkt(4072 - 16)).written
    assert w.free_bytes() == 8
    with pytest.raises(ValueError):
        RingWriter(make_ring(1)[1]).write(pkt(4096))


def test_writer_signalling_rules() -> None:
    _, ring = make_ring()
    w, r = RingWriter(ring), RingReader(ring)
    ring.interrupt_mask = 1  # consumer polling
    assert w.write(pkt(16)) == (True, False)
    ring.interrupt_mask = 0
    assert w.write(pkt(16)) == (True, False)  # ring was not empty
    r.read_all()
    assert w.write(pkt(16)) == (True, True)  # empty again → signal
    # old_write == read_index is checked against the *published* read index.
    r.read()
    assert w.write(pkt(16)) == (True, False)
    r.commit()
    loose = RingWriter(ring, policy=SignalPolicy.WHEN_UNMASKED)
    assert loose.write(pkt(16)) == (True, True)
    ring.interrupt_mask = 1
    assert loose.write(pkt(16)) == (True, False)


def test_reader_interrupt_mask_helpers() -> None:
    _, ring = make_ring()
    w, r = RingWriter(ring), RingReader(ring)
    r.mask_interrupts()
    assert ring.interrupt_mask == 1
    assert w.write(pkt(16)) == (True, False)
    assert r.unmask_interrupts() == 24  # a packet raced in: poll again
    assert ring.interrupt_mask == 0
    r.read_all()
    assert r.unmask_interrupts() == 0


def test_pending_send_sz_signal_transition() -> None:
    _, ring = make_ring(1)
    w, r = RingWriter(ring), RingReader(ring)
    for i in range(3):
        assert w.write(pkt(1000, i)).written  # 3 × 1008 = 3024 used, 1072 free
    assert w.write(pkt(1000, 9)).written  # 4032 used, 64 free
    blocked = w.write(pkt(1000, 10), set_pending_on_full=True)
    assert blocked == (False, False)
    assert ring.pending_send_sz == 1008
    # Consumer frees one packet: 64 + 1008 = 1072 > 1008 → the producer must be woken.
    assert r.read() is not None
    assert r.commit() is True
    # Freeing more while it is still pending is a null transition: no second signal.
    assert r.read() is not None
    assert r.commit() is False
    assert w.write(pkt(1000, 10), set_pending_on_full=True).written
    assert ring.pending_send_sz == 0  # cleared by the writer once it got through


def test_pending_send_sz_not_enough_freed_and_feature_bit() -> None:
    _, ring = make_ring(1)
    w, r = RingWriter(ring), RingReader(ring)
    for i in range(4):
        w.write(pkt(16, i))  # 4 × 24 = 96
    assert w.write(pkt(4096 - 96 - 8 - 8)).written  # 8 bytes free
    ring.pending_send_sz = 200
    r.read()
    assert r.commit() is False  # 32 free, still ≤ 200
    for _ in range(3):
        r.read()
    assert r.commit() is False  # 104 free, still ≤ 200
    r.read()
    assert r.commit() is True  # 4096 free now
    _, ring = make_ring(1)
    w, r = RingWriter(ring), RingReader(ring)
    w.write(pkt(4096 - 16))
    ring.pending_send_sz = 100
    ring.feature_bits = 0  # no feat_pending_send_sz: never signal
    r.read()
    assert r.commit() is False
    _, ring = make_ring(1)
    w, r = RingWriter(ring), RingReader(ring)
    w.write(pkt(16))
    ring.pending_send_sz = 100  # plenty free already: not a transition
    r.read()
    assert r.commit() is False


@pytest.mark.parametrize(
    ("field", "value"),
    [("write_index", 4096), ("write_index", 0xFFFFFFF8), ("write_index", 12)],
)
def test_bad_write_index(field: str, value: int) -> None:
    _, ring = make_ring()
    r = RingReader(ring)
    ring.write_index = value
    with pytest.raises(RingViolation) as exc:
        r.read()
    assert (exc.value.channel, exc.value.field, exc.value.value) == (7, field, value)


def test_bad_read_index_seen_by_writer_and_at_attach() -> None:
    _, ring = make_ring()
    w = RingWriter(ring)
    ring.read_index = 8192
    with pytest.raises(RingViolation) as exc:
        w.write(pkt(16))
    assert exc.value.field == "read_index" and exc.value.value == 8192
    ring.read_index = 4
    with pytest.raises(RingViolation):
        RingReader(ring)
    ring.read_index = 0
    ring.write_index = 4095
    with pytest.raises(RingViolation):
        RingWriter(ring)


def guest_wrote(ring: RingBuffer, raw: bytes, write_index: int | None = None) -> None:
    """Put raw bytes at the start of the data area as a (possibly malicious) producer."""
    ring.write_data(0, raw)
    ring.write_index = len(raw) if write_index is None else write_index


def test_packet_longer_than_available_data() -> None:
    _, ring = make_ring()
    r = RingReader(ring)
    raw = bytearray(pkt(32) + bytes(8))
    struct.pack_into("<H", raw, 4, 5)  # len8 5 = 40 bytes + trailer > 40 available
    guest_wrote(ring, bytes(raw))
    with pytest.raises(RingViolation) as exc:
        r.read()
    assert exc.value.field == "len8" and exc.value.value == 5
    assert r.private_read_index == 0  # nothing consumed


def test_malformed_descriptors() -> None:
    _, ring = make_ring()
    raw = bytearray(pkt(32) + bytes(8))
    struct.pack_into("<H", raw, 4, 1)  # len8 below a descriptor
    guest_wrote(ring, bytes(raw))
    with pytest.raises(RingViolation) as exc:
        RingReader(ring).read()
    assert exc.value.field == "len8"
    raw = bytearray(pkt(32) + bytes(8))
    struct.pack_into("<H", raw, 2, 5)  # offset8 beyond len8
    guest_wrote(ring, bytes(raw))
    with pytest.raises(RingViolation) as exc:
        RingReader(ring).read()
    assert exc.value.field == "offset8"
    guest_wrote(ring, bytes(16))  # 16 bytes: less than descriptor + trailer
    with pytest.raises(RingViolation) as exc:
        RingReader(ring).read()
    assert exc.value.field == "write_index"
    guest_wrote(ring, pkt(64) + bytes(8))
    with pytest.raises(RingViolation) as exc:
        RingReader(ring, max_packet_size=32).read()
    assert exc.value.field == "len8"


def test_violation_is_not_index_error() -> None:
    _, ring = make_ring()
    ring.write_index = 0xFFFFFFF0
    with pytest.raises(RingViolation) as exc:
        RingReader(ring).bytes_available()
    assert not isinstance(exc.value, IndexError)
    assert "channel 7" in str(exc.value)


def test_paged_ring_matches_flat_ring() -> None:
    """A ring over non-contiguous pages (a vmalloc'ed GPADL) behaves like a flat one."""
    backing = bytearray(PAGE * 5)
    order = [3, 0, 4, 1]  # control page = backing page 3, data pages 0, 4, 1
    pages = [memoryview(backing)[i * PAGE : (i + 1) * PAGE] for i in order]
    ring = RingBuffer(pages, channel="paged")
    ring.init_header()
    flat_mem, flat = make_ring(3)
    for rb in (ring, flat):
        w, r = RingWriter(rb), RingReader(rb)
        out = []
        for i in range(40):
            p = pkt(8 * (2 + (i * 37) % 500), i)
            while not w.write(p).written:
                got, _ = r.read_all()
                out.extend(got)
            if i % 7 == 0:
                got, _ = r.read_all()
                out.extend(got)
        out.extend(r.read_all()[0])
        assert out == [pkt(8 * (2 + (i * 37) % 500), i) for i in range(40)]
    assert struct.unpack_from("<I", backing, 3 * PAGE + 64)[0] == FEAT_PENDING_SEND_SZ


def test_paged_view_bounds() -> None:
    view = PagedView([memoryview(bytearray(PAGE)), memoryview(bytearray(PAGE))])
    view.write(PAGE - 2, b"abcd")
    assert view.read(PAGE - 2, 4) == b"abcd"
    with pytest.raises(ValueError):
        view.read(2 * PAGE - 1, 2)
    with pytest.raises(ValueError):
        PagedView([memoryview(bytearray(100))])
    with pytest.raises(ValueError):
        view.slice(1, PAGE)

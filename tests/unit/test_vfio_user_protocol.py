"""Wire formats of hvlab.protocol.vfio_user against the sizes and offsets in QEMU's vfio-user.rst."""

from __future__ import annotations

import pytest
from construct import Container

from hvlab.protocol import vfio_user as P


@pytest.mark.parametrize(
    ("struct", "size"),
    [
        (P.Header, 16),
        (P.DmaMap, 32),
        (P.DmaUnmap, 24),
        (P.DeviceInfo, 16),
        (P.RegionInfo, 32),
        (P.CapHeader, 8),
        (P.RegionIoFds, 16),
        (P.SubRegionIoFd, 40),
        (P.IrqInfo, 16),
        (P.IrqSet, 20),
        (P.RegionAccess, 16),
        (P.DmaAccess, 16),
        (P.WriteOne, 24),
        (P.WriteMulti, 8),
        (P.DeviceFeature, 8),
    ],
)
def test_struct_sizes(struct, size):
    assert struct.sizeof() == size


def test_header_layout():
    raw = P.build_header(0x1234, P.Command.REGION_WRITE, 20, P.MSG_FLAG_NO_REPLY, 0)
    assert raw == bytes.fromhex("3412 0a00 24000000 10000000 00000000".replace(" ", ""))
    h = P.Header.parse(raw)
    assert (h.msg_id, h.command, h.msg_size, h.flags) == (0x1234, 10, 36, 0x10)


def test_dma_map_field_offsets():
    raw = P.DmaMap.build(Container(argsz=32, flags=3, offset=0x1000, address=0x2000, size=0x3000))
    assert raw[8:16] == (0x1000).to_bytes(8, "little")
    assert raw[16:24] == (0x2000).to_bytes(8, "little")
    assert raw[24:32] == (0x3000).to_bytes(8, "little")


def test_sparse_mmap_cap_roundtrip():
    cap = Container(
        header=Container(id=P.VFIO_REGION_INFO_CAP_SPARSE_MMAP, version=1, next=0),
        nr_areas=2,
        reserved=0,
        areas=[Container(offset=0, size=0x1000), Container(offset=0x2000, size=0x1000)],
    )
    raw = P.SparseMmapCap.build(cap)
    assert len(raw) == 16 + 2 * 16
    back = P.SparseMmapCap.parse(raw)
    assert [(a.offset, a.size) for a in back.areas] == [(0, 0x1000), (0x2000, 0x1000)]


def test_command_numbers_match_spec():
    assert [int(c) for c in P.Command] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 16, 17, 18]
    assert P.command_name(13) == "DEVICE_RESET"
    assert P.command_name(14) == "UNKNOWN(14)"


def test_vfio_indices_and_flags():
    assert P.PciRegion.CONFIG == 7 and P.PciRegion.VGA == 8 and P.PciRegion.ROM == 6
    assert (P.PciIrq.INTX, P.PciIrq.MSI, P.PciIrq.MSIX, P.PciIrq.ERR, P.PciIrq.REQ) == (0, 1, 2, 3, 4)
    assert (P.VFIO_IRQ_SET_DATA_NONE, P.VFIO_IRQ_SET_DATA_BOOL, P.VFIO_IRQ_SET_DATA_EVENTFD) == (1, 2, 4)
    assert (P.VFIO_IRQ_SET_ACTION_MASK, P.VFIO_IRQ_SET_ACTION_UNMASK, P.VFIO_IRQ_SET_ACTION_TRIGGER) == (
        8,
        16,
        32,
    )


def test_capabilities_json_roundtrip():
    raw = P.capabilities_json({"max_msg_fds": 8, "pgsizes": 4096})
    assert raw.endswith(b"\0") and raw.count(b"\0") == 1
    assert P.parse_capabilities(raw) == {"max_msg_fds": 8, "pgsizes": 4096}
    assert P.parse_capabilities(b"") == {}


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b'{"capabilities":{}}', "NUL"),
        (b"{not json\0", "not JSON"),
        (b"[1,2]\0", "not a JSON object"),
        (b'{"capabilities":3}\0', "capabilities"),
        (b'{"capabilities":{"max_msg_fds":"many"}}\0', "max_msg_fds"),
        (b'{"capabilities":{"pgsizes":-1}}\0', "pgsizes"),
        (b'{"capabilities":{"write_multiple":1}}\0', "write_multiple"),
        (b"\xff\xfe\0", "not JSON"),
    ],
)
def test_capabilities_rejects(data, fragment):
    with pytest.raises(ValueError, match=fragment):
        P.parse_capabilities(data)

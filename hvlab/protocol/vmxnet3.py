"""vmxnet3 register file, commands, descriptors and shared-memory layouts (VMware's paravirtual NIC).

Facts from Linux's drivers/net/vmxnet3/vmxnet3_defs.h and upt1_defs.h (the guest's view, which is the
contract): BAR0 "PT" holds per-vector interrupt masks and ring doorbells, BAR1 "VD" holds version,
shared-area address, command, MAC and interrupt/event cause registers; everything else lives in guest
memory ("driver shared" area, queue descriptor table, rings) that the device reaches by DMA.

Declared once here with construct. The data path touches a 16-byte descriptor per frame, where a
construct parse costs tens of microseconds, so descriptors also get ``struct`` codecs plus bit
positions (``pack_*``/``unpack_*``); tests check that both views agree bit for bit.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from construct import (
    Array,
    BitsInteger,
    BitStruct,
    Bytes,
    ByteSwapped,
    Flag,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    Padding,
    Struct,
)

VENDOR_ID = 0x15AD  # VMware
DEVICE_ID = 0x07B0  # VMXNET3
CLASS_ETHERNET = 0x020000

# ----------------------------------------------------------------------------------------- registers
PT_REG_SIZE = 0x1000  # BAR0
VD_REG_SIZE = 0x1000  # BAR1
REG_ALIGN = 8


class Bar0(enum.IntEnum):
    """BAR0 ("PT") registers; each is an array with 8-byte stride (per interrupt or per queue)."""

    IMR = 0x000  # + 8 * interrupt index: 1 masks, 0 unmasks
    TXPROD = 0x600  # + 8 * tx queue: producer index (doorbell)
    RXPROD = 0x800  # + 8 * rx queue: ring 1 producer
    RXPROD2 = 0xA00  # + 8 * rx queue: ring 2 producer


class Bar1(enum.IntEnum):
    """BAR1 ("VD") registers, 32 bits wide at 8-byte spacing."""

    VRRS = 0x00  # revision report/select
    UVRS = 0x08  # UPT version report/select
    DSAL = 0x10  # driver-shared area address, low
    DSAH = 0x18  # driver-shared area address, high
    CMD = 0x20
    MACL = 0x28
    MACH = 0x30
    ICR = 0x38  # interrupt cause (read by INTx handlers)
    ECR = 0x40  # event cause, write 1 to clear


class Cmd(enum.IntEnum):
    """Commands written to Bar1.CMD; the result of a GET is read back from CMD."""

    ACTIVATE_DEV = 0xCAFE0000
    QUIESCE_DEV = 0xCAFE0001
    RESET_DEV = 0xCAFE0002
    UPDATE_RX_MODE = 0xCAFE0003
    UPDATE_MAC_FILTERS = 0xCAFE0004
    UPDATE_VLAN_FILTERS = 0xCAFE0005
    UPDATE_RSSIDT = 0xCAFE0006
    UPDATE_IML = 0xCAFE0007
    UPDATE_PMCFG = 0xCAFE0008
    UPDATE_FEATURE = 0xCAFE0009
    RESERVED1 = 0xCAFE000A
    LOAD_PLUGIN = 0xCAFE000B
    RESERVED2 = 0xCAFE000C
    RESERVED3 = 0xCAFE000D
    SET_COALESCE = 0xCAFE000E
    REGISTER_MEMREGS = 0xCAFE000F
    SET_RSS_FIELDS = 0xCAFE0010

    GET_QUEUE_STATUS = 0xF00D0000
    GET_STATS = 0xF00D0001
    GET_LINK = 0xF00D0002
    GET_PERM_MAC_LO = 0xF00D0003
    GET_PERM_MAC_HI = 0xF00D0004
    GET_DID_LO = 0xF00D0005
    GET_DID_HI = 0xF00D0006
    GET_DEV_EXTRA_INFO = 0xF00D0007
    GET_CONF_INTR = 0xF00D0008
    GET_RESERVED1 = 0xF00D0009  # "adaptive ring info" in older headers
    GET_TXDATA_DESC_SIZE = 0xF00D000A
    GET_COALESCE = 0xF00D000B
    GET_RSS_FIELDS = 0xF00D000C
    GET_RESERVED2 = 0xF00D000D
    GET_RESERVED3 = 0xF00D000E
    GET_MAX_QUEUES_CONF = 0xF00D000F


FIRST_SET = 0xCAFE0000
FIRST_GET = 0xF00D0000


def command_name(code: int) -> str:
    try:
        return Cmd(code).name
    except ValueError:
        return f"{code:#010x}"


# Interrupt configuration (GET_CONF_INTR: bits 0-1 type, bits 2-3 mask mode)
IT_AUTO, IT_INTX, IT_MSI, IT_MSIX = 0, 1, 2, 3
IMM_AUTO, IMM_ACTIVE, IMM_LAZY = 0, 1, 2

# Event cause bits (Bar1.ECR and DriverShared.ecr)
ECR_RQERR = 1 << 0
ECR_TQERR = 1 << 1
ECR_LINK = 1 << 2
ECR_DIC = 1 << 3
ECR_DEBUG = 1 << 4

# Queue error codes (QueueStatus.error)
ERR_NOEOP = 0x80000000
ERR_TXD_REUSE = 0x80000001
ERR_BIG_PKT = 0x80000002
ERR_DESC_NOT_SPT = 0x80000003
ERR_SMALL_BUF = 0x80000004
ERR_TXD_INVALID = 0x80000007

LINK_SPEED_MBPS = 10000
LINK_UP = LINK_SPEED_MBPS << 16 | 1
LINK_DOWN = 0

REV1_MAGIC = 0xBABEFEE1  # DriverShared.magic
INIT_GEN = 1
MAX_TX_QUEUES = 8
MAX_RX_QUEUES = 16
MAX_INTRS = 25
IC_DISABLE_ALL = 0x1  # IntrConf.intrCtrl
RING_SIZE_ALIGN = 32
RING_BA_ALIGN = 512
TX_RING_MAX = 4096
TC_RING_MAX = 4096
RX_RING_MAX = 4096
RC_RING_MAX = 8192
MAX_TX_BUF_SIZE = 1 << 14
MAX_TXD_PER_PKT = 16
TXDATA_DESC_SIZE = 128  # the v1 tx data ring entry (headers copied there by the driver)
TXDATA_DESC_MIN, TXDATA_DESC_MAX = 128, 2048

# UPT1 feature bits (MiscConf.uptFeatures)
UPT1_F_RXCSUM = 0x1
UPT1_F_RSS = 0x2
UPT1_F_RXVLAN = 0x4
UPT1_F_LRO = 0x8

# Rx modes (RxFilterConf.rxMode)
RXM_UCAST, RXM_MCAST, RXM_BCAST, RXM_ALL_MULTI, RXM_PROMISC = 0x01, 0x02, 0x04, 0x08, 0x10

# Tx offload modes and completion types
OM_NONE, OM_ENCAP, OM_CSUM, OM_TSO = 0, 1, 2, 3
CDTYPE_TXCOMP = 0
CDTYPE_RXCOMP = 3
RXD_BTYPE_HEAD, RXD_BTYPE_BODY = 0, 1

# ----------------------------------------------------------------------------------------- descriptors
# All descriptors are 16 bytes: a little-endian qword address (or comp fields) and two dwords of bitfields.
# construct's BitStruct reads most significant bit first, so each dword is ByteSwapped and lists its
# fields from bit 31 down to bit 0.

TxDesc = Struct(
    "addr" / Int64ul,
    "dword2" / ByteSwapped(BitStruct(
        "msscof" / BitsInteger(14), "ext1" / Flag, "dtype" / Flag, "oco" / Flag, "gen" / Flag,
        "len" / BitsInteger(14),
    )),
    "dword3" / ByteSwapped(BitStruct(
        "tci" / BitsInteger(16), "ti" / Flag, "ext2" / Flag, "cq" / Flag, "eop" / Flag,
        "om" / BitsInteger(2), "hlen" / BitsInteger(10),
    )),
)

TxCompDesc = Struct(
    "dword0" / ByteSwapped(BitStruct("ext1" / BitsInteger(20), "txdIdx" / BitsInteger(12))),
    "ext2" / Int32ul,
    "ext3" / Int32ul,
    "dword3" / ByteSwapped(BitStruct("gen" / Flag, "type" / BitsInteger(7), "rsvd" / BitsInteger(24))),
)

RxDesc = Struct(
    "addr" / Int64ul,
    "dword2" / ByteSwapped(BitStruct(
        "gen" / Flag, "rsvd" / BitsInteger(15), "dtype" / Flag, "btype" / Flag, "len" / BitsInteger(14),
    )),
    "ext1" / Int32ul,
)

RxCompDesc = Struct(
    "dword0" / ByteSwapped(BitStruct(
        "ext2" / Flag, "cnc" / Flag, "rssType" / BitsInteger(4), "rqID" / BitsInteger(10),
        "sop" / Flag, "eop" / Flag, "ext1" / BitsInteger(2), "rxdIdx" / BitsInteger(12),
    )),
    "rssHash" / Int32ul,
    "dword2" / ByteSwapped(BitStruct(
        "tci" / BitsInteger(16), "ts" / Flag, "err" / Flag, "len" / BitsInteger(14),
    )),
    "dword3" / ByteSwapped(BitStruct(
        "gen" / Flag, "type" / BitsInteger(7), "fcs" / Flag, "frg" / Flag, "v4" / Flag, "v6" / Flag,
        "ipc" / Flag, "tcp" / Flag, "udp" / Flag, "tuc" / Flag, "csum" / BitsInteger(16),
    )),
)

DESC_SIZE = 16
_DESC = struct.Struct("<QII")
_COMP = struct.Struct("<IIII")


class Txd(NamedTuple):
    """The TxDesc fields the device uses."""

    addr: int
    len: int
    gen: int
    eop: bool
    cq: bool
    dtype: bool
    om: int
    hlen: int
    ti: bool
    tci: int
    msscof: int


def unpack_txd(raw: bytes | memoryview) -> Txd:
    """A TxDesc without construct (hot path)."""
    addr, d2, d3 = _DESC.unpack(raw)
    return Txd(addr, d2 & 0x3FFF, (d2 >> 14) & 1, bool(d3 & 1 << 12), bool(d3 & 1 << 13),
               bool(d2 & 1 << 16), (d3 >> 10) & 3, d3 & 0x3FF, bool(d3 & 1 << 15), d3 >> 16, d2 >> 18)


def pack_txd(addr: int, length: int, gen: int, *, eop: bool = True, cq: bool = True, om: int = 0,
             hlen: int = 0, msscof: int = 0, ti: bool = False, tci: int = 0) -> bytes:
    """A TxDesc as the driver writes it (the tests' minimal driver uses this)."""
    d2 = (length & 0x3FFF) | (gen & 1) << 14 | (msscof & 0x3FFF) << 18
    d3 = (hlen & 0x3FF) | (om & 3) << 10 | int(eop) << 12 | int(cq) << 13 | int(ti) << 15 | (tci & 0xFFFF) << 16
    return _DESC.pack(addr, d2, d3)


def pack_tcd(txd_idx: int, gen: int) -> bytes:
    """A TxCompDesc (completion of everything up to the EOP descriptor ``txd_idx``)."""
    return _COMP.pack(txd_idx & 0xFFF, 0, 0, CDTYPE_TXCOMP << 24 | (gen & 1) << 31)


def unpack_tcd(raw: bytes | memoryview) -> tuple[int, int, int]:
    """(txdIdx, type, gen)."""
    d0, _, _, d3 = _COMP.unpack(raw)
    return d0 & 0xFFF, (d3 >> 24) & 0x7F, d3 >> 31


def unpack_rxd(raw: bytes | memoryview) -> tuple[int, int, int, int]:
    """(addr, len, btype, gen) of an RxDesc."""
    addr, d2, _ = _DESC.unpack(raw)
    return addr, d2 & 0x3FFF, (d2 >> 14) & 1, d2 >> 31


def pack_rxd(addr: int, length: int, btype: int, gen: int) -> bytes:
    return _DESC.pack(addr, (length & 0x3FFF) | (btype & 1) << 14 | (gen & 1) << 31, 0)


def pack_rcd(rxd_idx: int, rq_id: int, length: int, gen: int, *, sop: bool, eop: bool,
             cnc: bool = True, tci: int = 0, ts: bool = False, err: bool = False) -> bytes:
    """An RxCompDesc. ``cnc`` (checksum not calculated) is the honest answer of a device that does not
    verify checksums; the driver then leaves the checksum to the stack."""
    d0 = (rxd_idx & 0xFFF) | int(eop) << 14 | int(sop) << 15 | (rq_id & 0x3FF) << 16 | int(cnc) << 30
    d2 = (length & 0x3FFF) | int(err) << 14 | int(ts) << 15 | (tci & 0xFFFF) << 16
    d3 = CDTYPE_RXCOMP << 24 | (gen & 1) << 31
    return _COMP.pack(d0, 0, d2, d3)


def unpack_rcd(raw: bytes | memoryview) -> dict[str, int]:
    d0, _, d2, d3 = _COMP.unpack(raw)
    return {"rxdIdx": d0 & 0xFFF, "eop": (d0 >> 14) & 1, "sop": (d0 >> 15) & 1, "rqID": (d0 >> 16) & 0x3FF,
            "cnc": (d0 >> 30) & 1, "len": d2 & 0x3FFF, "err": (d2 >> 14) & 1, "ts": (d2 >> 15) & 1,
            "tci": d2 >> 16, "type": (d3 >> 24) & 0x7F, "gen": d3 >> 31}


# ----------------------------------------------------------------------------------------- shared memory
GOSInfo = ByteSwapped(BitStruct(
    "gosMisc" / BitsInteger(10), "gosVer" / BitsInteger(16), "gosType" / BitsInteger(4), "gosBits" / BitsInteger(2),
))

DriverInfo = Struct("version" / Int32ul, "gos" / GOSInfo, "vmxnet3RevSpt" / Int32ul, "uptVerSpt" / Int32ul)

MiscConf = Struct(
    "driverInfo" / DriverInfo,
    "uptFeatures" / Int64ul,
    "ddPA" / Int64ul,
    "queueDescPA" / Int64ul,
    "ddLen" / Int32ul,
    "queueDescLen" / Int32ul,
    "mtu" / Int32ul,
    "maxNumRxSG" / Int16ul,
    "numTxQueues" / Int8ul,
    "numRxQueues" / Int8ul,
    "reserved" / Array(4, Int32ul),
)

IntrConf = Struct(
    "autoMask" / Int8ul,
    "numIntrs" / Int8ul,
    "eventIntrIdx" / Int8ul,
    "modLevels" / Array(MAX_INTRS, Int8ul),
    "intrCtrl" / Int32ul,
    "reserved" / Array(2, Int32ul),
)

VFT_SIZE = 4096 // 32
RxFilterConf = Struct(
    "rxMode" / Int32ul,
    "mfTableLen" / Int16ul,
    Padding(2),
    "mfTablePA" / Int64ul,
    "vfTable" / Array(VFT_SIZE, Int32ul),
)

VariableLenConfDesc = Struct("confVer" / Int32ul, "confLen" / Int32ul, "confPA" / Int64ul)

DSDevRead = Struct(
    "misc" / MiscConf,
    "intrConf" / IntrConf,
    "rxFilterConf" / RxFilterConf,
    "rssConfDesc" / VariableLenConfDesc,
    "pmConfDesc" / VariableLenConfDesc,
    "pluginConfDesc" / VariableLenConfDesc,
)

DriverShared = Struct(
    "magic" / Int32ul,
    Padding(4),
    "devRead" / DSDevRead,
    "ecr" / Int32ul,
    "reserved" / Int32ul,
    "cmdInfo" / Bytes(16),
)
DRIVER_SHARED_SIZE = DriverShared.sizeof()
ECR_OFFSET = 8 + DSDevRead.sizeof()
CMD_INFO_OFFSET = ECR_OFFSET + 8
INTR_CTRL_OFFSET = 8 + MiscConf.sizeof() + 28  # devRead.intrConf.intrCtrl

QueueStatus = Struct("stopped" / Int8ul, Padding(3), "error" / Int32ul)

TxStats = Struct(
    "TSOPktsTxOK" / Int64ul, "TSOBytesTxOK" / Int64ul, "ucastPktsTxOK" / Int64ul, "ucastBytesTxOK" / Int64ul,
    "mcastPktsTxOK" / Int64ul, "mcastBytesTxOK" / Int64ul, "bcastPktsTxOK" / Int64ul, "bcastBytesTxOK" / Int64ul,
    "pktsTxError" / Int64ul, "pktsTxDiscard" / Int64ul,
)
RxStats = Struct(
    "LROPktsRxOK" / Int64ul, "LROBytesRxOK" / Int64ul, "ucastPktsRxOK" / Int64ul, "ucastBytesRxOK" / Int64ul,
    "mcastPktsRxOK" / Int64ul, "mcastBytesRxOK" / Int64ul, "bcastPktsRxOK" / Int64ul, "bcastBytesRxOK" / Int64ul,
    "pktsRxOutOfBuf" / Int64ul, "pktsRxError" / Int64ul,
)

TxQueueConf = Struct(
    "txRingBasePA" / Int64ul,
    "dataRingBasePA" / Int64ul,
    "compRingBasePA" / Int64ul,
    "ddPA" / Int64ul,
    "reserved" / Int64ul,
    "txRingSize" / Int32ul,
    "dataRingSize" / Int32ul,
    "compRingSize" / Int32ul,
    "ddLen" / Int32ul,
    "intrIdx" / Int8ul,
    Padding(1),
    "txDataRingDescSize" / Int16ul,
    Padding(4),
)

RxQueueConf = Struct(
    "rxRingBasePA" / Array(2, Int64ul),
    "compRingBasePA" / Int64ul,
    "ddPA" / Int64ul,
    "rxDataRingBasePA" / Int64ul,
    "rxRingSize" / Array(2, Int32ul),
    "compRingSize" / Int32ul,
    "ddLen" / Int32ul,
    "intrIdx" / Int8ul,
    Padding(1),
    "rxDataRingDescSize" / Int16ul,
    Padding(4),
)

TxQueueCtrl = Struct("txNumDeferred" / Int32ul, "txThreshold" / Int32ul, "reserved" / Int64ul)
RxQueueCtrl = Struct("updateRxProd" / Int8ul, Padding(7), "reserved" / Int64ul)

TxQueueDesc = Struct("ctrl" / TxQueueCtrl, "conf" / TxQueueConf, "status" / QueueStatus, "stats" / TxStats,
                     Padding(88))
RxQueueDesc = Struct("ctrl" / RxQueueCtrl, "conf" / RxQueueConf, "status" / QueueStatus, "stats" / RxStats,
                     Padding(88))
QUEUE_DESC_SIZE = 256
QUEUE_CONF_OFFSET = TxQueueCtrl.sizeof()
QUEUE_STATUS_OFFSET = QUEUE_CONF_OFFSET + TxQueueConf.sizeof()
QUEUE_STATS_OFFSET = QUEUE_STATUS_OFFSET + QueueStatus.sizeof()

assert TxQueueDesc.sizeof() == RxQueueDesc.sizeof() == QUEUE_DESC_SIZE
assert MiscConf.sizeof() == 72 and IntrConf.sizeof() == 40 and RxFilterConf.sizeof() == 528
assert DRIVER_SHARED_SIZE == 720

"""Integration-component (IC) messages: what the host and Linux's hv_utils exchange on the heartbeat,
shutdown, timesync, KVP and VSS channels (include/linux/hyperv.h, drivers/hv/hv_util.c,
drivers/hv/channel_mgmt.c:vmbus_prep_negotiate_resp).

Every IC message travels as the payload of one VM_PKT_DATA_INBAND packet and has three parts:

    vmbuspipe_hdr (8 B)   flags u32 @0, msgsize u32 @4           -- ignored by Linux
    icmsg_hdr (20 B)      icverframe {major u16, minor u16} @8, icmsgtype u16 @12,
                          icvermsg {major, minor} @14, icmsgsize u16 @18, status u32 @20,
                          ictransaction_id u8 @24, icflags u8 @25, reserved[2] @26
    body                  @28 (ICMSG_HDR), depends on icmsgtype

The host always speaks first. Linux answers each request by rewriting the buffer in place (version
choice, sequence number + 1, status), setting icflags = TRANSACTION | RESPONSE and sending the same
number of bytes back as an in-band packet whose trans_id echoes the host's (hv_util.c). It reads at
most one 4 KiB page per packet (vmbus_recvpacket with HV_HYP_PAGE_SIZE), so a request must stay below
that.

Pure data layouts and functions; the guest-side functions at the end model hv_utils so the host
devices can be unit-tested without a VM.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from hvlab.protocol.errors import FieldError

PIPE_HDR_SIZE = 8
"""sizeof(struct vmbuspipe_hdr)."""
ICMSG_HDR_SIZE = 20
"""sizeof(struct icmsg_hdr)."""
ICMSG_HDR = PIPE_HDR_SIZE + ICMSG_HDR_SIZE
"""28: offset of the message body (the kernel's ICMSG_HDR macro)."""
NEGOTIATE_FIXED_SIZE = 8
"""icframe_vercnt u16, icmsg_vercnt u16, reserved u32 before icversion_data[]."""
IC_VERSION_NEGOTIATION_MAX_VER_COUNT = 100
"""Linux rejects a negotiate request announcing more versions than this in either list."""
MAX_IC_PACKET = 4096
"""hv_utils reads each packet into one HV_HYP_PAGE_SIZE buffer; longer ones fail with -ENOBUFS."""

# icmsgtype (include/linux/hyperv.h ICMSGTYPE_*)
ICMSGTYPE_NEGOTIATE = 0
ICMSGTYPE_HEARTBEAT = 1
ICMSGTYPE_KVPEXCHANGE = 2
ICMSGTYPE_SHUTDOWN = 3
ICMSGTYPE_TIMESYNC = 4
ICMSGTYPE_VSS = 5
ICMSGTYPE_FCOPY = 7

# icflags
ICMSGHDRFLAG_TRANSACTION = 1
ICMSGHDRFLAG_REQUEST = 2
ICMSGHDRFLAG_RESPONSE = 4

# status (HRESULTs)
HV_S_OK = 0x00000000
HV_E_FAIL = 0x80004005

# Shutdown flags (hv_util.c:shutdown_onchannelcallback): bit 0 = "force", the rest selects the action.
SHUTDOWN_FLAG_FORCE = 0x1
SHUTDOWN_FLAG_RESTART = 0x2
SHUTDOWN_FLAG_HIBERNATE = 0x4

SHUTDOWN_MSG_SIZE = 12 + 2048
"""sizeof(struct shutdown_msg_data): reason_code, timeout_seconds, flags, display_message[2048]."""
HEARTBEAT_MSG_SIZE = 8 + 32
"""sizeof(struct heartbeat_msg_data): seq_num u64, reserved u32[8]. Linux only requires the u64."""


def ic_version(major: int, minor: int) -> int:
    """(major << 16) | minor, the encoding hv_util.c uses for its version tables."""
    return ((major & 0xFFFF) << 16) | (minor & 0xFFFF)


def ic_version_str(version: int) -> str:
    return f"{version >> 16}.{version & 0xFFFF}"


UTIL_FW_VERSION = ic_version(3, 0)
"""IC framework version of Windows Server 2012 and later hosts."""
UTIL_WS2K8_FW_VERSION = ic_version(1, 0)
"""IC framework version of Windows Server 2008 hosts."""

FRAMEWORK_VERSIONS: tuple[int, ...] = (UTIL_FW_VERSION, UTIL_WS2K8_FW_VERSION)
"""hv_util.c fw_versions[] (highest first); identical in 6.1, 6.12 and 7.3."""
HEARTBEAT_VERSIONS: tuple[int, ...] = (ic_version(3, 0), ic_version(1, 0))
"""hv_util.c hb_versions[]."""
SHUTDOWN_VERSIONS: tuple[int, ...] = (ic_version(3, 2), ic_version(3, 1), ic_version(3, 0), ic_version(1, 0))
"""hv_util.c sd_versions[] (3.1 added restart, 3.2 hibernate)."""
TIMESYNC_VERSIONS: tuple[int, ...] = (ic_version(4, 0), ic_version(3, 0), ic_version(1, 0))
"""hv_util.c ts_versions[]: 4.0 carries the host's reference-counter value with each sample."""
TIMESYNC_V4 = ic_version(4, 0)

# Timesync flags (include/linux/hyperv.h ICTIMESYNCFLAG_*)
ICTIMESYNCFLAG_PROBE = 0
ICTIMESYNCFLAG_SYNC = 1
"""Step the guest clock to the host's (hv_utils schedules do_settimeofday64)."""
ICTIMESYNCFLAG_SAMPLE = 2
"""Only a sample for the guest's "hyperv" PTP clock."""
WLTIMEDELTA = 116444736000000000
"""100-ns intervals between 1601-01-01 (Windows time) and 1970-01-01 (Unix time)."""
TIMESYNC_V4_SIZE = 22
"""sizeof(struct ictimesync_ref_data) (packed): parenttime, vmreferencetime, flags, leapflags, stratum, rsvd[3]."""
TIMESYNC_V3_SIZE = 25
"""sizeof(struct ictimesync_data) (packed): parenttime, childtime, roundtriptime, flags."""

_PIPE = struct.Struct("<II")
_ICHDR = struct.Struct("<HHHHHHIBBH")  # fw major/minor, type, msg major/minor, size, status, tid, flags, rsvd
_NEGO = struct.Struct("<HHI")
_VER = struct.Struct("<HH")
_HEARTBEAT = struct.Struct("<Q32x")
_SHUTDOWN = struct.Struct("<III")
_TIMESYNC_V4 = struct.Struct("<QQBBB3x")
_TIMESYNC_V3 = struct.Struct("<QQQB")


class IcError(FieldError):
    """An IC message that is too short or inconsistent (``field`` and ``value`` say what)."""

    what = "IC"
    hex_value = False


@dataclass
class IcHeader:
    """struct icmsg_hdr, versions as (major << 16) | minor."""

    fw_version: int
    msgtype: int
    msg_version: int
    msgsize: int
    status: int = HV_S_OK
    transaction_id: int = 0
    flags: int = ICMSGHDRFLAG_TRANSACTION | ICMSGHDRFLAG_REQUEST

    def pack(self) -> bytes:
        return _ICHDR.pack(
            self.fw_version >> 16,
            self.fw_version & 0xFFFF,
            self.msgtype,
            self.msg_version >> 16,
            self.msg_version & 0xFFFF,
            self.msgsize,
            self.status,
            self.transaction_id & 0xFF,
            self.flags,
            0,
        )

    @property
    def is_response(self) -> bool:
        return bool(self.flags & ICMSGHDRFLAG_RESPONSE)


@dataclass
class IcMessage:
    """A parsed IC packet payload; ``body`` is everything after ICMSG_HDR (padding included)."""

    pipe_flags: int
    pipe_msgsize: int
    header: IcHeader
    body: bytes


def build_ic_message(
    msgtype: int,
    body: bytes,
    *,
    fw_version: int,
    msg_version: int,
    transaction_id: int = 0,
    flags: int = ICMSGHDRFLAG_TRANSACTION | ICMSGHDRFLAG_REQUEST,
    status: int = HV_S_OK,
) -> bytes:
    """Pipe header + icmsg_hdr + body, as the host sends it (icmsgsize = body length)."""
    header = IcHeader(fw_version, msgtype, msg_version, len(body), status, transaction_id, flags)
    packed = header.pack() + bytes(body)
    out = _PIPE.pack(0, len(packed)) + packed
    if len(out) > MAX_IC_PACKET:
        raise ValueError(f"IC message of {len(out)} bytes exceeds hv_utils' {MAX_IC_PACKET}-byte buffer")
    return out


def parse_ic_message(payload: bytes | bytearray | memoryview) -> IcMessage:
    """Split an IC payload; raises IcError when it is shorter than ICMSG_HDR (Linux's own check)."""
    data = bytes(payload)
    if len(data) < ICMSG_HDR:
        raise IcError("length", len(data), f"shorter than the {ICMSG_HDR}-byte IC header")
    pflags, psize = _PIPE.unpack_from(data, 0)
    fmaj, fmin, mtype, mmaj, mmin, size, status, tid, flags, _ = _ICHDR.unpack_from(data, PIPE_HDR_SIZE)
    header = IcHeader((fmaj << 16) | fmin, mtype, (mmaj << 16) | mmin, size, status, tid, flags)
    return IcMessage(pflags, psize, header, data[ICMSG_HDR:])


# Bodies ------------------------------------------------------------------------------------------


@dataclass
class Negotiate:
    """struct icmsg_negotiate: framework versions first, then service versions."""

    fw_versions: list[int]
    srv_versions: list[int]


def build_negotiate(fw_versions: Sequence[int], srv_versions: Sequence[int]) -> bytes:
    """The host's ICMSGTYPE_NEGOTIATE body listing what it offers (highest first by convention)."""
    out = _NEGO.pack(len(fw_versions), len(srv_versions), 0)
    for v in (*fw_versions, *srv_versions):
        out += _VER.pack(v >> 16, v & 0xFFFF)
    return out


def parse_negotiate(body: bytes) -> Negotiate:
    """Parse a negotiate body; counts that overrun the body raise IcError."""
    if len(body) < NEGOTIATE_FIXED_SIZE:
        raise IcError("length", len(body), "negotiate body shorter than its 8 fixed bytes")
    nfw, nsrv, _ = _NEGO.unpack_from(body, 0)
    need = NEGOTIATE_FIXED_SIZE + 4 * (nfw + nsrv)
    if need > len(body):
        raise IcError("icframe_vercnt", nfw, f"{nfw}+{nsrv} versions overrun the {len(body)}-byte body")
    versions = [_VER.unpack_from(body, NEGOTIATE_FIXED_SIZE + 4 * i) for i in range(nfw + nsrv)]
    flat = [(major << 16) | minor for major, minor in versions]
    return Negotiate(flat[:nfw], flat[nfw:])


def build_heartbeat(seq_num: int) -> bytes:
    """struct heartbeat_msg_data with the host's sequence number."""
    return _HEARTBEAT.pack(seq_num & 0xFFFFFFFFFFFFFFFF)


def parse_heartbeat(body: bytes) -> int:
    """The sequence number (Linux only requires the u64 to be present, not the reserved words)."""
    if len(body) < 8:
        raise IcError("length", len(body), "heartbeat body shorter than its u64 seq_num")
    return int.from_bytes(body[:8], "little")


@dataclass
class ShutdownRequest:
    flags: int
    reason_code: int = 0
    timeout_seconds: int = 0
    display_message: bytes = b""


def build_shutdown(
    flags: int = 0, *, reason_code: int = 0, timeout_seconds: int = 0, display_message: str = ""
) -> bytes:
    """struct shutdown_msg_data (2060 bytes). The message text is UTF-16LE as Windows writes it."""
    text = display_message.encode("utf-16-le")[:2046]
    return _SHUTDOWN.pack(reason_code, timeout_seconds, flags) + text + bytes(2048 - len(text))


def parse_shutdown(body: bytes) -> ShutdownRequest:
    if len(body) < SHUTDOWN_MSG_SIZE:
        raise IcError("length", len(body), f"shutdown body shorter than {SHUTDOWN_MSG_SIZE} bytes")
    reason, timeout, flags = _SHUTDOWN.unpack_from(body, 0)
    return ShutdownRequest(flags, reason, timeout, body[12:SHUTDOWN_MSG_SIZE])


@dataclass
class TimeSample:
    parenttime: int
    """Host time in 100-ns units since 1601-01-01 (Windows FILETIME)."""
    flags: int
    vmreferencetime: int = 0
    """v4: the partition reference counter (100 ns) when the host took ``parenttime``."""


def unix_to_parenttime(seconds: float) -> int:
    return int(seconds * 10_000_000) + WLTIMEDELTA


def build_timesync(version: int, sample: TimeSample) -> bytes:
    """struct ictimesync_ref_data (v4) or ictimesync_data (v1/v3) for the negotiated service version."""
    if version >= TIMESYNC_V4:
        return _TIMESYNC_V4.pack(sample.parenttime, sample.vmreferencetime, sample.flags, 0, 0)
    return _TIMESYNC_V3.pack(sample.parenttime, 0, 0, sample.flags)


def parse_timesync(version: int, body: bytes) -> TimeSample:
    if version >= TIMESYNC_V4:
        if len(body) < TIMESYNC_V4_SIZE:
            raise IcError("length", len(body), f"timesync v4 body shorter than {TIMESYNC_V4_SIZE} bytes")
        parent, ref, flags, _, _ = _TIMESYNC_V4.unpack_from(body)
        return TimeSample(parent, flags, ref)
    if len(body) < TIMESYNC_V3_SIZE:
        raise IcError("length", len(body), f"timesync body shorter than {TIMESYNC_V3_SIZE} bytes")
    parent, _, _, flags = _TIMESYNC_V3.unpack_from(body)
    return TimeSample(parent, flags)


# Guest side (a model of hv_utils, for tests) ------------------------------------------------------


def guest_negotiate_response(
    payload: bytes, fw_versions: Sequence[int], srv_versions: Sequence[int]
) -> tuple[bytes, int | None, int | None]:
    """What vmbus_prep_negotiate_resp() does to a host negotiate request.

    The guest walks *its own* lists highest first and takes the first version the host also listed;
    it answers icframe_vercnt = icmsg_vercnt = 1 with the choice in icversion_data[0] and [1], or
    both counts 0 when there is no common framework or service version, sets icmsgsize to 0x10 and
    marks the header as a response. Returns (response bytes, framework, service); None = no match.
    """
    buf = bytearray(payload)
    msg = parse_ic_message(buf)
    nego = parse_negotiate(msg.body)
    fw = next((v for v in fw_versions if v in nego.fw_versions), None)
    srv = next((v for v in srv_versions if v in nego.srv_versions), None) if fw is not None else None
    ok = fw is not None and srv is not None
    base = ICMSG_HDR
    struct.pack_into("<HH", buf, base, 1 if ok else 0, 1 if ok else 0)
    if len(buf) >= base + NEGOTIATE_FIXED_SIZE + 8:
        fw_out = fw if fw is not None else 0
        srv_out = srv if srv is not None else 0
        _VER.pack_into(buf, base + NEGOTIATE_FIXED_SIZE, fw_out >> 16, fw_out & 0xFFFF)
        _VER.pack_into(buf, base + NEGOTIATE_FIXED_SIZE + 4, srv_out >> 16, srv_out & 0xFFFF)
    struct.pack_into("<H", buf, PIPE_HDR_SIZE + 10, 0x10)  # icmsgsize
    buf[PIPE_HDR_SIZE + 17] = ICMSGHDRFLAG_TRANSACTION | ICMSGHDRFLAG_RESPONSE
    return bytes(buf), fw if ok else None, srv if ok else None


def guest_heartbeat_response(payload: bytes) -> bytes:
    """heartbeat_onchannelcallback(): seq_num += 1 in place, flags = TRANSACTION | RESPONSE."""
    buf = bytearray(payload)
    seq = parse_heartbeat(parse_ic_message(buf).body)
    struct.pack_into("<Q", buf, ICMSG_HDR, (seq + 1) & 0xFFFFFFFFFFFFFFFF)
    buf[PIPE_HDR_SIZE + 17] = ICMSGHDRFLAG_TRANSACTION | ICMSGHDRFLAG_RESPONSE
    return bytes(buf)


def guest_timesync_response(payload: bytes, version: int) -> tuple[bytes, TimeSample]:
    """timesync_onchannelcallback(): take the sample, answer with the buffer marked as a response."""
    buf = bytearray(payload)
    sample = parse_timesync(version, parse_ic_message(buf).body)
    buf[PIPE_HDR_SIZE + 17] = ICMSGHDRFLAG_TRANSACTION | ICMSGHDRFLAG_RESPONSE
    return bytes(buf), sample


def guest_shutdown_response(
    payload: bytes, *, hibernation_supported: bool = False
) -> tuple[bytes, str | None]:
    """shutdown_onchannelcallback(): status S_OK for flags 0-3 (and 4-5 when hibernation is
    supported), E_FAIL otherwise; returns (response, action) with action in
    {"poweroff", "reboot", "hibernate", None}."""
    buf = bytearray(payload)
    req = parse_shutdown(parse_ic_message(buf).body)
    action: str | None
    if req.flags in (0, 1):
        action = "poweroff"
    elif req.flags in (2, 3):
        action = "reboot"
    elif req.flags in (4, 5) and hibernation_supported:
        action = "hibernate"
    else:
        action = None
    struct.pack_into("<I", buf, PIPE_HDR_SIZE + 12, HV_S_OK if action else HV_E_FAIL)
    buf[PIPE_HDR_SIZE + 17] = ICMSGHDRFLAG_TRANSACTION | ICMSGHDRFLAG_RESPONSE
    return bytes(buf), action

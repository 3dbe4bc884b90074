"""Message framing over an AF_UNIX stream socket, with file descriptors as SCM_RIGHTS ancillary data.

Shared by the server and the client. A vfio-user stream has no resynchronisation marker, so this module
is careful to consume exactly ``msg_size`` bytes per message whenever that is possible: a peer that sends
a bad header must not make us misread every later message.
"""

from __future__ import annotations

import array
import errno
import os
import socket
from dataclasses import dataclass, field

from hvlab.protocol import vfio_user as P

#: Control buffer room for this many descriptors per recvmsg; more than any sane message carries, so a
#: peer sending too many is detected (and the surplus closed) rather than silently truncated.
_FD_ROOM = 64
#: A message larger than the negotiated maximum is drained and refused; one larger than this is not
#: worth draining and ends the connection.
DRAIN_LIMIT = 64 << 20


class ConnectionClosed(Exception):
    """The peer closed the socket (between messages, or in the middle of one when ``partial``)."""

    def __init__(self, partial: bool = False) -> None:
        super().__init__("peer closed the connection" + (" in the middle of a message" if partial else ""))
        self.partial = partial


class FramingError(Exception):
    """A message whose header was read but which cannot be taken as a whole.

    ``header`` is the parsed header (so an error reply can echo the id and command); ``fatal`` means the
    stream position is lost and the connection must be dropped after replying.
    """

    def __init__(self, header: P.Container, err: int, reason: str, fatal: bool = False) -> None:
        super().__init__(reason)
        self.header = header
        self.errno = err
        self.reason = reason
        self.fatal = fatal


@dataclass
class Message:
    """One received or to-be-sent vfio-user message."""

    msg_id: int
    command: int
    flags: int = 0
    error: int = 0
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return (self.flags & P.MSG_TYPE_MASK) == P.MSG_TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & P.MSG_FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & P.MSG_FLAG_ERROR)

    def close_fds(self) -> None:
        """Close every descriptor that came with the message and was not taken over by a handler."""
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

    def take_fds(self) -> list[int]:
        """Hand the descriptors over to the caller, who now owns (and must close) them."""
        fds, self.fds = self.fds, []
        return fds


def _fds_from_ancdata(ancdata: list[tuple[int, int, bytes]], into: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
            into.extend(fds)


def _recv_exact(sock: socket.socket, n: int, fds: list[int], first: bool) -> bytes:
    """Read exactly ``n`` bytes, gathering any descriptors that arrive with them."""
    chunks: list[bytes] = []
    got = 0
    cmsg_len = socket.CMSG_SPACE(_FD_ROOM * 4)
    while got < n:
        try:
            data, ancdata, msg_flags, _ = sock.recvmsg(n - got, cmsg_len)
        except InterruptedError:
            continue
        _fds_from_ancdata(ancdata, fds)
        if not data:
            raise ConnectionClosed(partial=not (first and got == 0))
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def recv_message(sock: socket.socket, max_size: int) -> Message:
    """Receive one whole message.

    Raises ConnectionClosed at end of stream, FramingError for a header that cannot be honoured (too
    small or too large ``msg_size``; descriptors that came along are closed), and socket.timeout when the
    peer stops in the middle of a message before the header is complete (after it, a FramingError marked fatal); either way the stream position
    is lost and the caller should drop the connection.
    """
    fds: list[int] = []
    try:
        raw = _recv_exact(sock, P.HEADER_SIZE, fds, first=True)
        hdr = P.Header.parse(raw)
        if hdr.msg_size < P.HEADER_SIZE:
            # Take it as a bare header: the most likely intent, and it keeps the stream in step.
            raise FramingError(hdr, errno.EINVAL, f"msg_size {hdr.msg_size} is smaller than the header")
        body_len = hdr.msg_size - P.HEADER_SIZE
        if hdr.msg_size > max_size:
            if hdr.msg_size > DRAIN_LIMIT:
                raise FramingError(
                    hdr, errno.E2BIG, f"msg_size {hdr.msg_size} exceeds {max_size}", fatal=True
                )
            left = body_len
            while left:
                left -= len(_recv_exact(sock, min(left, 1 << 16), fds, first=False))
            raise FramingError(hdr, errno.E2BIG, f"msg_size {hdr.msg_size} exceeds {max_size}")
        try:
            body = _recv_exact(sock, body_len, fds, first=False) if body_len else b""
        except TimeoutError:
            raise FramingError(
                hdr,
                errno.EINVAL,
                f"truncated: msg_size {hdr.msg_size} but the payload stopped short",
                fatal=True,
            ) from None
    except BaseException:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        raise
    return Message(hdr.msg_id, hdr.command, hdr.flags, hdr.error, body, fds)


def send_message(sock: socket.socket, msg: Message) -> None:
    """Send one message; its descriptors (not closed here) ride on the first byte."""
    data = P.build_header(msg.msg_id, msg.command, len(msg.payload), msg.flags, msg.error) + msg.payload
    send_raw(sock, data, msg.fds)


def send_raw(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send bytes as they are (tests use this to send malformed messages)."""
    view = memoryview(data)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    while view:
        try:
            sent = sock.sendmsg([view], anc)
        except InterruptedError:
            continue
        anc = []
        view = view[sent:]

"""Host side of the guest agent: ``guest.run("ip -d link", timeout=10)`` and file put/get.

The transport is a byte pipe (the VMM's second UART): ``on_output`` is fed whatever the guest writes to
the port, ``send`` writes towards the guest.  Requests and answers are single lines whose payloads are
base64 (see ``files/hvlab-agent``), so framing survives any output.  A request that gets no answer within
its timeout, or a machine that stops, raises GuestError instead of hanging the caller.
"""

from __future__ import annotations

import base64
import itertools
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hvlab.errors import GuestError

MARK = b"@@HVLAB "
FILES = __import__("pathlib").Path(__file__).parent / "files"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode() or "-"


def _unb64(text: str) -> bytes:
    return b"" if text == "-" else base64.b64decode(text)


@dataclass
class RunResult:
    """What a guest command did."""

    returncode: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    seconds: float

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode(errors="replace")

    def check(self) -> RunResult:
        if self.returncode != 0:
            raise GuestError(f"guest command failed with exit status {self.returncode}: {self.stderr.strip()}")
        return self


class Agent:
    """Talks to ``hvlab-agent`` in the guest.  Thread-safe; one request at a time."""

    def __init__(self, send: Callable[[bytes], None], alive: Callable[[], bool] = lambda: True) -> None:
        self._send = send
        self._alive = alive
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._answers: dict[str, list[str]] = {}
        self._ready = False
        self._ids = itertools.count(1)
        self._request_lock = threading.Lock()
        self.noise = bytearray()  # anything on the port that is not an answer (kept for debugging)

    def on_output(self, data: bytes) -> None:
        """Bytes the guest wrote to the agent port."""
        with self._cond:
            self._buf += data
            while True:
                nl = self._buf.find(b"\n")
                if nl < 0:
                    break
                line = bytes(self._buf[:nl]).rstrip(b"\r")
                del self._buf[:nl + 1]
                start = line.find(MARK)
                if start < 0:
                    self.noise += line + b"\n"
                    continue
                fields = line[start + len(MARK):].decode(errors="replace").split()
                if fields == ["READY"]:
                    self._ready = True
                elif len(fields) >= 2:
                    self._answers[fields[1]] = fields
                self._cond.notify_all()

    @property
    def ready(self) -> bool:
        return self._ready

    def wait_ready(self, timeout: float) -> None:
        try:
            self._wait(lambda: self._ready, timeout, "the guest agent did not start")
        except GuestError as exc:
            if self.noise:  # what the port did carry says whether the agent's shell ran at all
                raise GuestError(f"{exc}; the port carried {bytes(self.noise[-300:])!r}") from None
            raise

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                if not self._alive():
                    raise GuestError(f"{what}: the guest stopped")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestError(f"{what} within {timeout:.0f} s")
                self._cond.wait(min(left, 0.2))

    def _request(self, line: str, timeout: float, what: str) -> list[str]:
        with self._request_lock:
            ident = line.split()[1]
            self._send(line.encode() + b"\n")
            self._wait(lambda: ident in self._answers, timeout, what)
            with self._cond:
                return self._answers.pop(ident)

    def run(self, command: str, timeout: float = 60.0) -> RunResult:
        """Run a shell command in the guest; the guest kills it after ``timeout`` seconds."""
        ident = str(next(self._ids))
        t0 = time.monotonic()
        limit = max(1, int(timeout))
        fields = self._request(f"R {ident} {limit} {_b64(command.encode())}", timeout + 10,
                               f"no answer to {shlex.quote(command)[:80]}")
        rc = int(fields[2])
        out = _unb64(fields[3]) if len(fields) > 3 else b""
        err = _unb64(fields[4]) if len(fields) > 4 else b""
        if rc == 137:
            err += f"\n(hvlab: killed after the {limit} s timeout)".encode()
        return RunResult(rc, out, err, time.monotonic() - t0)

    def fire(self, command: str) -> None:
        """Start a command without waiting for an answer (e.g. ``poweroff -f``, which never answers)."""
        self._send(f"R {next(self._ids)} 0 {_b64(command.encode())}\n".encode())

    def put(self, path: str, data: bytes, timeout: float = 60.0) -> None:
        ident = str(next(self._ids))
        fields = self._request(f"P {ident} {_b64(path.encode())} {_b64(data)}", timeout, f"putting {path}")
        if fields[2] != "0":
            raise GuestError(f"could not write {path} in the guest (status {fields[2]})")

    def get(self, path: str, timeout: float = 60.0) -> bytes:
        ident = str(next(self._ids))
        fields = self._request(f"G {ident} {_b64(path.encode())}", timeout, f"getting {path}")
        if fields[2] != "0":
            raise GuestError(f"could not read {path} in the guest")
        return _unb64(fields[3])

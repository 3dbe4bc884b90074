"""A small synchronous QMP client (QEMU Machine Protocol: JSON lines over a Unix socket).

Enough for hvlab's hot-plug tests: ``execute`` one command at a time and collect asynchronous events
(``DEVICE_DELETED`` after a device_del the guest agreed to) for ``wait_event``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

from hvlab.errors import HvlabError


class QmpError(HvlabError):
    """QEMU answered a command with an error."""


class Qmp:
    def __init__(self, path: str, *, timeout: float = 30.0, connect_for: float = 10.0) -> None:
        deadline = time.monotonic() + connect_for
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise HvlabError(f"QEMU's QMP socket {path} did not appear") from None
                time.sleep(0.05)
        s.settimeout(timeout)
        self.sock = s
        self._buf = b""
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.greeting = self._read()
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)  # TimeoutError leaves the buffer intact
            except TimeoutError:
                raise
            except OSError as e:
                raise HvlabError(f"QEMU closed the QMP connection ({e})") from None
            if not chunk:
                raise HvlabError("QEMU closed the QMP connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a command and return its "return" value; QmpError on an "error" answer."""
        with self._lock:
            msg: dict[str, Any] = {"execute": command}
            if arguments:
                msg["arguments"] = arguments
            try:
                self.sock.sendall(json.dumps(msg).encode() + b"\n")
            except OSError as e:
                raise HvlabError(f"QEMU closed the QMP connection ({e})") from None
            while True:
                r = self._read()
                if "event" in r:
                    self.events.append(r)
                    continue
                if "error" in r:
                    raise QmpError(f"QMP {command}: {r['error'].get('desc', r['error'])}")
                return r.get("return")

    def wait_event(self, name: str, timeout: float = 30.0, **data: Any) -> dict[str, Any]:
        """Wait for an event whose data contains ``data`` (events already seen count)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for i, e in enumerate(self.events):
                    if e["event"] == name and all(e.get("data", {}).get(k) == v for k, v in data.items()):
                        return self.events.pop(i)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HvlabError(f"no QMP event {name} {data or ''} within {timeout:.0f} s")
                self.sock.settimeout(left)
                try:
                    self.events.append(self._read())
                except TimeoutError:
                    continue
                finally:
                    self.sock.settimeout(30.0)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

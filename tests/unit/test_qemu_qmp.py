"""The QMP client against a scripted fake QEMU: greeting, capabilities, commands, errors, events that
arrive before, between and after replies, and a QEMU that goes away."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from hvlab.errors import HvlabError
from hvlab.qemu.qmp import Qmp, QmpError


def fake_qemu(path, script):
    """Serve one connection: send the greeting, then for each received command send script's answer lines."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    received = []

    def run():
        conn, _ = srv.accept()
        conn.sendall(b'{"QMP": {"version": {"qemu": {"major": 11, "minor": 1}}, "capabilities": []}}\n')
        buf = b""
        for answers in script:
            while b"\n" not in buf:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            received.append(json.loads(line))
            for a in answers:
                conn.sendall(a if isinstance(a, bytes) else json.dumps(a).encode() + b"\n")
        conn.close()
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return received, t


def test_commands_events_and_errors(tmp_path):
    path = tmp_path / "qmp.sock"
    deleted = {"event": "DEVICE_DELETED", "data": {"device": "vf0", "path": "/machine/peripheral/vf0"}}
    received, t = fake_qemu(path, [
        [{"return": {}}],  # qmp_capabilities
        [{"event": "SOMETHING"}, {"return": {}}],  # device_add, an event first
        [{"error": {"class": "GenericError", "desc": "Duplicate device ID 'vf0'"}}],
        [b'{"return": {}}\n{"event": "DEVICE_',  # a reply and half an event in one read
         b'DELETED", "data": {"device": "vf0"}}\n'],
        [{"return": {"status": "running"}}, deleted],
    ])
    q = Qmp(str(path), timeout=5)
    assert q.greeting["QMP"]["version"]["qemu"]["major"] == 11
    assert q.execute("device_add", {"driver": "vfio-user-pci", "id": "vf0"}) == {}
    with pytest.raises(QmpError, match="Duplicate device ID"):
        q.execute("device_add", {"driver": "vfio-user-pci", "id": "vf0"})
    q.execute("device_del", {"id": "vf0"})
    assert q.wait_event("DEVICE_DELETED", 5, device="vf0")["data"]["device"] == "vf0"
    assert q.execute("query-status") == {"status": "running"}
    assert q.wait_event("DEVICE_DELETED", 5, device="vf0")["data"]["path"].endswith("vf0")
    assert [m["execute"] for m in received] == ["qmp_capabilities", "device_add", "device_add", "device_del",
                                                "query-status"]
    assert received[1]["arguments"] == {"driver": "vfio-user-pci", "id": "vf0"}
    assert [e["event"] for e in q.events] == ["SOMETHING"]
    q.close()
    t.join(5)


def test_wait_event_times_out(tmp_path):
    path = tmp_path / "qmp.sock"
    _, t = fake_qemu(path, [[{"return": {}}], []])
    q = Qmp(str(path), timeout=5)
    with pytest.raises(HvlabError, match="no QMP event DEVICE_DELETED"):
        q.wait_event("DEVICE_DELETED", 0.3)
    q.close()


def test_qemu_going_away_is_an_error(tmp_path):
    path = tmp_path / "qmp.sock"
    _, t = fake_qemu(path, [[{"return": {}}]])
    q = Qmp(str(path), timeout=5)
    t.join(5)
    with pytest.raises(HvlabError, match="closed the QMP connection"):
        q.execute("query-status")


def test_missing_socket(tmp_path):
    with pytest.raises(HvlabError, match="did not appear"):
        Qmp(str(tmp_path / "none.sock"), connect_for=0.2)

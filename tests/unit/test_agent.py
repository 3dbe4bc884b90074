"""The guest agent script, run under busybox on a pty, driven by the host-side Agent."""

import os
import shutil
import subprocess
import threading

import pytest

from hvlab.agent.host import FILES, Agent
from hvlab.errors import GuestError

BUSYBOX = shutil.which("busybox") or "/bin/busybox"


@pytest.fixture
def agent(tmp_path):
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox not installed")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for applet in ("sh", "base64", "stty", "timeout", "mkdir", "dirname", "cat", "printf", "echo", "sleep",
                   "head", "true"):
        os.symlink(BUSYBOX, bindir / applet)
    master, slave = os.openpty()
    proc = subprocess.Popen([BUSYBOX, "sh", str(FILES / "hvlab-agent"), os.ttyname(slave)],
                            env={"PATH": str(bindir)}, cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ag = Agent(lambda data: os.write(master, data), alive=lambda: proc.poll() is None)

    def pump():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            ag.on_output(data)

    threading.Thread(target=pump, daemon=True).start()
    ag.wait_ready(30)  # generous: CI runs this beside a nested VM on two cores
    yield ag
    proc.kill()
    proc.wait()
    os.close(master)
    os.close(slave)


def test_run_returns_status_stdout_stderr(agent):
    r = agent.run("echo out; echo err >&2; exit 3", timeout=10)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")


def test_output_framing_survives_any_bytes(agent):
    # marker text, binary bytes, CR/LF and no trailing newline must all come back unchanged
    r = agent.run(r"printf '@@HVLAB R 1 0 - -\r\n\001\377x'", timeout=10)
    assert r.returncode == 0
    assert r.stdout_bytes == b"@@HVLAB R 1 0 - -\r\n\x01\xffx"
    r2 = agent.run("echo next", timeout=10)
    assert r2.stdout == "next\n"


def test_empty_output(agent):
    r = agent.run("true", timeout=10)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_put_and_get_roundtrip(agent, tmp_path):
    data = bytes(range(256)) * 64
    target = str(tmp_path / "sub" / "blob.bin")
    agent.put(target, data)
    assert agent.get(target) == data
    with pytest.raises(GuestError):
        agent.get(str(tmp_path / "missing"))


def test_guest_side_timeout_kills_command(agent):
    r = agent.run("sleep 30", timeout=1)
    assert r.returncode == 137
    assert "timeout" in r.stderr


def test_dead_guest_is_an_error_not_a_hang():
    ag = Agent(lambda data: None, alive=lambda: False)
    with pytest.raises(GuestError, match="stopped"):
        ag.run("true", timeout=5)

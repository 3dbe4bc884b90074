"""`hvlab qemu` and `hvlab vf serve` are registered, documented, and refuse bad arguments clearly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from hvlab.cli import build_parser, main


def test_commands_registered_with_man_page_help(capsys):
    p = build_parser()
    args = p.parse_args(["qemu", "--kernel", "6.1", "--vf", "vmxnet3", "--hotplug", "--exec", "true"])
    assert (args.kernel, args.vf, args.hotplug, args.command) == ("6.1", "vmxnet3", True, "true")
    args = p.parse_args(["vf", "serve", "vmxnet3", "--socket", "/tmp/x.sock", "--mac", "00:15:5d:00:00:01"])
    assert args.model == "vmxnet3" and args.socket == "/tmp/x.sock"
    for cmd in (["qemu", "--help"], ["vf", "serve", "--help"]):
        with pytest.raises(SystemExit):
            main(cmd)
        out = capsys.readouterr().out
        assert "exit status:" in out and "examples:" in out


def test_bad_mac_is_a_usage_error(capsys):
    assert main(["vf", "serve", "vmxnet3", "--socket", "/tmp/hvlab-unused.sock", "--mac", "nope"]) == 2
    assert "--mac" in capsys.readouterr().err
    assert main(["qemu", "--vf", "vmxnet3", "--mac", "00:11"]) == 2


def test_vf_serve_runs_until_sigterm(tmp_path):
    sock = tmp_path / "vf.sock"
    proc = subprocess.Popen([sys.executable, "-m", "hvlab", "vf", "serve", "vmxnet3", "--socket", str(sock),
                             "--mac", "00:15:5d:00:02:02"], stderr=subprocess.PIPE, text=True)
    try:
        from hvlab.vfio_user import VfioUserClient

        c = VfioUserClient.connect(sock, retry_for=20)
        c.negotiate()
        assert c.config_read(0, 4) == 0x07B015AD
        assert c.bar_read(1, 0x28, 4) == 0x005D1500  # MACL
        c.close()
    finally:
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)
        err = proc.communicate(timeout=20)[1]
    assert proc.returncode == 0, err
    assert "1 connection(s)" in err and not sock.exists()

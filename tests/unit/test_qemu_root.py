"""The QEMU root: private apt options stay inside the root, the run command uses the root's loader,
libraries, firmware and modules, readiness needs the marker, and building refuses clearly without root."""

from __future__ import annotations

import stat

import pytest

from hvlab.errors import HvlabError
from hvlab.qemu import root as R


def test_apt_options_are_private_to_the_root():
    opts = R.QemuRoot._apt_options()
    pairs = dict(o.split("=", 1) for o in opts[1::2])
    assert set(opts[0::2]) == {"-o"}
    assert pairs["Dir::Etc::SourceParts"] == "/dev/null"
    for key in ("Dir::Etc::SourceList", "Dir::State::Lists", "Dir::Cache"):
        assert pairs[key].startswith("/" + R.APT_DIR), key  # chroot-relative: the root's private state


def test_command_and_env_point_into_the_root(tmp_path):
    r = R.QemuRoot(tmp_path / "root")
    cmd = r.command()
    assert cmd[0] == str(tmp_path / "root/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    assert cmd[1] == "--library-path" and all(p.startswith(str(tmp_path)) for p in cmd[2].split(":"))
    assert cmd[3] == str(r.binary)
    assert cmd[4:] == ["-L", str(tmp_path / "root/usr/share/qemu"), "-L", str(tmp_path / "root/usr/share/seabios")]
    assert r.env()["QEMU_MODULE_DIR"] == str(tmp_path / "root/usr/lib/x86_64-linux-gnu/qemu")


def test_ready_needs_marker_and_binary(tmp_path):
    r = R.QemuRoot(tmp_path / "root")
    assert not r.ready
    r.binary.parent.mkdir(parents=True)
    r.binary.write_text("")
    assert not r.ready
    (r.path / R.MARKER).write_text("x")
    assert r.ready


def test_version_parsing_with_a_stand_in_binary(tmp_path):
    """version_tuple reads `qemu --version`; a stand-in loader script plays the root's ld.so."""
    r = R.QemuRoot(tmp_path / "root")
    loader = tmp_path / "root/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    loader.parent.mkdir(parents=True)
    loader.write_text("#!/bin/sh\necho 'QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)'\n")
    loader.chmod(loader.stat().st_mode | stat.S_IXUSR)
    assert r.version_tuple() == (11, 1)
    loader.write_text("#!/bin/sh\necho broken >&2; exit 1\n")
    with pytest.raises(HvlabError, match="does not run"):
        r.version()


def test_build_without_root_is_a_clear_error_simulated(tmp_path, monkeypatch):
    monkeypatch.setattr(R.os, "geteuid", lambda: 1000)
    with pytest.raises(HvlabError, match="needs root"):
        R.QemuRoot(tmp_path / "root").ensure()

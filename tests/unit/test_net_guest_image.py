"""The guest image's network tools: ip and ethtool with their ldd closure, and the static hvlab-udp."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hvlab.errors import NotFound
from hvlab.guest import initramfs
from hvlab.guest.initramfs import read_cpio
from hvlab.guest.testing import fake_kernel

needs_tools = pytest.mark.skipif(shutil.which("ip", path=initramfs._SEARCH_PATH) is None
                                 or shutil.which("ethtool", path=initramfs._SEARCH_PATH) is None,
                                 reason="needs iproute2 and ethtool (scripts/install.sh)")


@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    """A private cache and the host's real busybox (its applet list decides where `ip` must point)."""
    monkeypatch.setenv("HVLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path


def unpack(entries: dict[str, initramfs.CpioEntry], root: Path) -> None:
    """Write a cpio's entries to ``root`` (dirs, files with modes, symlinks; device nodes skipped)."""
    for name, e in sorted(entries.items()):
        dest = root / name
        if e.is_dir:
            dest.mkdir(parents=True, exist_ok=True)
        elif e.is_symlink:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(e.data.decode())
        elif e.is_file:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(e.data)
            dest.chmod(e.mode & 0o7777)


@needs_tools
def test_ldd_closure_lists_loader_and_libc() -> None:
    libs = initramfs.ldd_closure(initramfs.host_binary("ip"))
    assert any("ld-linux" in lib for lib in libs) and any(Path(lib).name == "libc.so.6" for lib in libs)
    assert all(lib.startswith("/") and Path(lib).exists() for lib in libs)
    assert initramfs.ldd_closure(initramfs.busybox_path()) == []  # static
    with pytest.raises(NotFound):
        initramfs.host_binary("no-such-tool-hvlab")


@needs_tools
def test_guest_image_has_tools_with_every_library_and_they_run(env) -> None:
    k = fake_kernel(env / "k")
    e = read_cpio(initramfs.build_guest_initramfs(k).read_bytes())
    for name in ("ip", "ethtool"):
        host = initramfs.host_binary(name)
        assert e[f"usr/sbin/{name}"].data == host.read_bytes() and e[f"usr/sbin/{name}"].mode & 0o111
        for lib in initramfs.ldd_closure(host):
            assert e[lib.lstrip("/")].data == Path(lib).read_bytes(), lib
    # busybox's own ip applet (first on the guest's PATH) now points at the real one
    bb_ip = [a for a in initramfs.busybox_applets(initramfs.busybox_path()) if a.endswith("/ip")]
    for applet in bb_ip:
        assert e[applet].is_symlink and e[applet].data == b"/usr/sbin/ip"
    assert e["bin/sh"].data == b"/bin/busybox"
    if shutil.which("gcc"):
        tool = e[initramfs.UDP_TOOL_PATH.lstrip("/")]
        assert tool.data[:4] == b"\x7fELF" and tool.mode & 0o111

    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    root = env / "root"
    unpack(e, root)
    # the copied closure is enough on its own: run the tools inside a chroot of the unpacked image
    r = subprocess.run(["chroot", str(root), "/usr/sbin/ip", "-V"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "iproute2" in r.stdout, r.stderr
    r = subprocess.run(["chroot", str(root), "/sbin/ip", "-d", "link", "show", "lo"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and "LOOPBACK" in r.stdout, r.stderr
    # busybox sh prefers its own `ip` applet over PATH; the agent prepends the profile to each command
    # (the same composition as hvlab-agent's R request), which makes plain `ip -d link` iproute2's
    agent_like = ('mkdir -p /tmp; { [ -r /etc/hvlab/profile ] && cat /etc/hvlab/profile; '
                  'echo "ip -d link show lo; ip -V"; } > /tmp/cmd; sh /tmp/cmd')
    r = subprocess.run(["chroot", str(root), "/bin/sh", "-c", agent_like], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and "promiscuity" in r.stdout and "iproute2" in r.stdout, r.stdout + r.stderr
    assert b"cat /etc/hvlab/profile" in e["hvlab/agent"].data
    r = subprocess.run(["chroot", str(root), "/usr/sbin/ethtool", "--version"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and "ethtool" in r.stdout, r.stderr
    if shutil.which("gcc"):
        r = subprocess.run(["chroot", str(root), "/usr/bin/hvlab-udp"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "usage: hvlab-udp" in r.stderr


@needs_tools
def test_binaries_change_the_cache_key_and_missing_ones_fail(env, monkeypatch) -> None:
    k = fake_kernel(env / "k")
    plain = initramfs.build(k, modules=["hv_netvsc"], init="#!/bin/sh\n")
    with_ip = initramfs.build(k, modules=["hv_netvsc"], init="#!/bin/sh\n", binaries=["ip"])
    assert plain != with_ip and "usr/sbin/ip" not in read_cpio(plain.read_bytes())
    assert initramfs.build(k, modules=["hv_netvsc"], init="#!/bin/sh\n", binaries=["ip"]) == with_ip
    with pytest.raises(NotFound, match="no-such-tool"):
        initramfs.build(k, modules=["hv_netvsc"], init="#!/bin/sh\n", binaries=["no-such-tool"])


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_udp_tool_is_static_and_cached_by_content(env, monkeypatch) -> None:
    a = initramfs.udp_tool()
    assert a is not None and initramfs._is_static_elf(a) and a.parent.parent.name == "guest-tools"
    mtime = a.stat().st_mtime_ns
    assert initramfs.udp_tool() == a and a.stat().st_mtime_ns == mtime  # not rebuilt
    monkeypatch.setattr(initramfs, "guest_file", lambda n: "int main(void) { return 0; }\n")
    b = initramfs.udp_tool()
    assert b is not None and b != a  # new source, new build
    monkeypatch.setattr(initramfs, "guest_file", lambda n: "this is not C\n")
    with pytest.raises(initramfs.HvlabError, match="gcc -static failed"):
        initramfs.udp_tool()
    monkeypatch.setattr(initramfs.shutil, "which", lambda n: None)
    assert initramfs.udp_tool() is None

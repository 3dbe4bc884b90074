"""initramfs images: cpio format, contents, module placement, caching, the default guest."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from hvlab.errors import NotFound
from hvlab.guest import initramfs
from hvlab.guest.initramfs import CpioWriter, read_cpio
from hvlab.guest.testing import FAKE_MODULES, fake_kernel

FAKE_BUSYBOX = b"\x7fELF fake static busybox"


@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    """Cache in tmp_path and a fake busybox, so nothing depends on the host."""
    monkeypatch.setenv("HVLAB_CACHE", str(tmp_path / "cache"))
    bb = tmp_path / "busybox"
    bb.write_bytes(FAKE_BUSYBOX)
    monkeypatch.setattr(initramfs, "busybox_path", lambda: bb)
    monkeypatch.setattr(initramfs, "busybox_applets",
                        lambda _bb: ["bin/sh", "sbin/insmod", "sbin/modprobe", "usr/bin/base64", "sbin/poweroff"])
    return tmp_path


def test_cpio_roundtrip() -> None:
    w = CpioWriter()
    w.file("a/b/c.txt", b"hello", 0o600)
    w.symlink("bin/sh", "/bin/busybox")
    w.chardev("dev/console", 5, 1)
    w.file("odd", b"x" * 5)
    blob = w.getvalue()
    assert blob.endswith(b"\0" * (-len(blob) % 4) or blob[-1:])
    e = read_cpio(blob)
    assert set(e) == {"a", "a/b", "a/b/c.txt", "bin", "bin/sh", "dev", "dev/console", "odd"}
    assert e["a/b/c.txt"].data == b"hello" and e["a/b/c.txt"].mode == 0o100600
    assert e["a"].is_dir and e["bin/sh"].is_symlink and e["bin/sh"].data == b"/bin/busybox"
    assert e["dev/console"].rdev == (5, 1)
    assert read_cpio(gzip.compress(blob)) == e
    with pytest.raises(ValueError):
        w.file("odd", b"again")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs cpio")
def test_cpio_readable_by_gnu_cpio(tmp_path) -> None:
    w = CpioWriter()
    w.file("init", b"#!/bin/sh\n", 0o755)
    w.symlink("bin/sh", "/bin/busybox")
    out = subprocess.run(["cpio", "-t", "--quiet"], input=w.getvalue(), capture_output=True, check=True)
    assert out.stdout.decode().split() == ["init", "bin", "bin/sh"]


def test_build_contents(env) -> None:
    k = fake_kernel(env / "k", suffixes=(".xz", ".gz"))
    path = initramfs.build(k, modules=["hv_netvsc", "pci-hyperv"], init="#!/bin/sh\necho hi\n",
                           files={"/etc/motd": b"hello", "/usr/bin/tool": b"#!/bin/sh\n"},
                           optional_modules=["vmxnet3", "not-there"])
    assert path.parent == env / "cache" / "initramfs"
    e = read_cpio(path.read_bytes())
    assert e["init"].data == b"#!/bin/sh\necho hi\n" and e["init"].mode & 0o111
    assert e["bin/busybox"].data == FAKE_BUSYBOX and e["bin/busybox"].mode & 0o111
    assert e["bin/sh"].data == b"/bin/busybox" and e["sbin/insmod"].is_symlink
    assert e["dev/console"].rdev == (5, 1)
    assert e["etc/motd"].data == b"hello" and not e["etc/motd"].mode & 0o111
    assert e["usr/bin/tool"].mode & 0o111
    md = "lib/modules/9.9.9-test"
    order = e[f"{md}/hvlab.modules"].data.decode().split()
    assert order == ["kernel/drivers/hv/hv_vmbus.ko", "kernel/drivers/net/hyperv/hv_netvsc.ko",
                     "kernel/drivers/pci/controller/pci-hyperv-intf.ko",
                     "kernel/drivers/pci/controller/pci-hyperv.ko", "kernel/drivers/net/vmxnet3/vmxnet3.ko"]
    for rel in order:
        assert e[f"{md}/{rel}"].data[:4] == b"\x7fELF"  # decompressed
    assert not any(n.endswith((".xz", ".gz", ".zst")) for n in e)
    assert e["etc/hvlab-modules"].data.decode().split() == [f"/{md}/{r}" for r in order[:4]]
    assert e["etc/hvlab-optional-modules"].data.decode().split() == [f"/{md}/{order[4]}"]
    dep = e[f"{md}/modules.dep"].data.decode()
    deps = dict(line.split(":") for line in dep.splitlines())
    assert set(deps["kernel/drivers/pci/controller/pci-hyperv.ko"].split()) == {
        "kernel/drivers/pci/controller/pci-hyperv-intf.ko", "kernel/drivers/hv/hv_vmbus.ko"}
    assert "kernel/drivers/hv/hv_vmbus.ko:\n" in dep
    assert f"{md}/modules.builtin" in e
    assert not any("hv_utils" in n or "mlx" in n for n in e)


def test_build_is_cached_by_content(env, monkeypatch) -> None:
    k = fake_kernel(env / "k")
    a = initramfs.build(k, modules=["hv_netvsc"], init="#!/bin/sh\n")
    ino, blob = a.stat().st_ino, a.read_bytes()
    calls = []
    monkeypatch.setattr(initramfs, "CpioWriter", lambda: calls.append(1))  # would break a rebuild
    assert initramfs.build(k, modules=["hv_netvsc"], init="#!/bin/sh\n") == a
    assert a.stat().st_ino == ino and a.read_bytes() == blob and not calls
    monkeypatch.undo()
    monkeypatch.setenv("HVLAB_CACHE", str(env / "cache"))
    monkeypatch.setattr(initramfs, "busybox_path", lambda: env / "busybox")
    assert initramfs.build(k, modules=["hv_netvsc"], init="#!/bin/sh\n# changed\n") != a
    assert initramfs.build(k, modules=["hv_netvsc"], init="#!/bin/sh\n", files={"x": b"1"}) != a


def test_builtin_modules_are_not_packed(env) -> None:
    k = fake_kernel(env / "k", builtin=("hv_vmbus", "pci-hyperv", "pci-hyperv-intf"))
    e = read_cpio(initramfs.build_guest_initramfs(k).read_bytes())
    order = e["lib/modules/9.9.9-test/hvlab.modules"].data.decode().split()
    assert [Path(p).name for p in order] == ["hv_netvsc.ko", "hv_utils.ko", "vmxnet3.ko"]


def test_guest_initramfs_has_init_and_agent(env) -> None:
    k = fake_kernel(env / "k")
    e = read_cpio(initramfs.build_guest_initramfs(k, files={"/etc/extra": b"1"}).read_bytes())
    init = e["init"].data.decode()
    assert init.startswith("#!/bin/sh") and "hvlab.modules" in init and "/hvlab/agent" in init
    assert e["hvlab/agent"].mode & 0o111 and b"@@HVLAB READY" in e["hvlab/agent"].data
    assert "etc/extra" in e
    names = [Path(p).name for p in e["lib/modules/9.9.9-test/hvlab.modules"].data.decode().split()]
    assert names == ["hv_vmbus.ko", "hv_netvsc.ko", "pci-hyperv-intf.ko", "pci-hyperv.ko", "hv_utils.ko",
                     "vmxnet3.ko"]


def test_guest_initramfs_refuses_kernel_without_drivers(env) -> None:
    mods = tuple(m for m in FAKE_MODULES if m[0] != "hv_netvsc")
    k = fake_kernel(env / "k", modules=mods)
    with pytest.raises(NotFound, match="hv_netvsc"):
        initramfs.build_guest_initramfs(k)


def test_missing_requested_module(env) -> None:
    k = fake_kernel(env / "k")
    with pytest.raises(NotFound, match="e1000e"):
        initramfs.build(k, modules=["hv_netvsc", "e1000e"], init="#!/bin/sh\n")


def test_static_elf_check() -> None:
    for p in (Path("/bin/busybox"), Path("/bin/sh")):
        if p.exists():
            initramfs._is_static_elf(p)  # must not raise on real binaries
    assert not initramfs._is_static_elf(Path("/nonexistent"))


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_fetch_busybox_from_private_apt(tmp_path, monkeypatch) -> None:
    from hvlab.guest import apt

    monkeypatch.setenv("HVLAB_CACHE", str(tmp_path / "cache"))
    records = [*apt.parse_packages("Package: busybox-static\nVersion: 1:1.37.0-6\n", "trixie"),
               *apt.parse_packages("Package: busybox-static\nVersion: 1:1.35.0-4\n", "bookworm")]

    class FakeApt:
        def update(self, force: bool = False) -> bool:
            return False

        def records(self) -> list[apt.Package]:
            return records

        def download(self, pkgs, dest: Path) -> dict[str, Path]:
            (p,) = pkgs
            assert p.version == "1:1.37.0-6"  # trixie's, not bookworm's
            tree = tmp_path / "tree"
            (tree / "DEBIAN").mkdir(parents=True)
            (tree / "DEBIAN/control").write_text(f"Package: {p.name}\nVersion: {p.version}\nArchitecture: "
                                                 "amd64\nMaintainer: x <x@x>\nDescription: x\n")
            (tree / "usr/bin").mkdir(parents=True)
            (tree / "usr/bin/busybox").write_bytes(b"\x7fELF")
            dest.mkdir(parents=True)
            deb = dest / "bb.deb"
            subprocess.run(["dpkg-deb", "-Zgzip", "--build", str(tree), str(deb)], check=True, capture_output=True)
            return {p.name: deb}

    bb = initramfs.fetch_busybox(FakeApt())  # type: ignore[arg-type]
    assert bb.read_bytes() == b"\x7fELF" and bb.parent.parent.name == "1_1.37.0-6"
    assert initramfs.fetch_busybox(None) == bb  # cached, no apt needed

"""Fake kernels and modules for tests, so that module and initramfs logic can be tested without downloads.

Other rooms' unit tests can use ``fake_kernel(tmp_path)`` wherever they need a ``Kernel`` with a modules
tree (building an initramfs, checking driver requirements) but no real kernel.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from pathlib import Path

from hvlab.guest.kernels import Kernel

#: (name, depends, subdir) of the fake tree: the same shape as the real Hyper-V drivers.
FAKE_MODULES = (
    ("hv_vmbus", (), "drivers/hv"),
    ("hv_netvsc", ("hv_vmbus",), "drivers/net/hyperv"),
    ("pci-hyperv-intf", (), "drivers/pci/controller"),
    ("pci-hyperv", ("pci_hyperv_intf", "hv_vmbus"), "drivers/pci/controller"),
    ("hv_utils", ("hv_vmbus",), "drivers/hv"),
    ("vmxnet3", (), "drivers/net/vmxnet3"),
    ("mlx5_core", ("pci_hyperv_intf", "mlxfw"), "drivers/net/ethernet/mellanox"),
    ("mlxfw", (), "drivers/net/ethernet/mellanox"),
)


def make_ko(name: str, depends: tuple[str, ...] | list[str] = (), aliases: tuple[str, ...] = ()) -> bytes:
    """A minimal ELF64 relocatable with just a ``.modinfo`` section, as depmod/modinfo read it."""
    info = b"".join(s.encode() + b"\0" for s in (
        f"name={name.replace('-', '_')}", f"depends={','.join(depends)}", *(f"alias={a}" for a in aliases),
        "license=GPL"))
    shstr = b"\0.modinfo\0.shstrtab\0"
    info_off = 64
    shstr_off = info_off + len(info)
    shoff = (shstr_off + len(shstr) + 7) & ~7
    hdr = bytearray(64)
    hdr[:16] = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    struct.pack_into("<HHIQQQIHHHHHH", hdr, 16, 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)

    def sh(name_off: int, typ: int, off: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name_off, typ, 0, 0, off, size, 0, 0, 1, 0)

    body = bytes(hdr) + info + shstr
    body += b"\0" * (shoff - len(body))
    return body + sh(0, 0, 0, 0) + sh(1, 1, info_off, len(info)) + sh(10, 3, shstr_off, len(shstr))


def compress(data: bytes, suffix: str) -> bytes:
    if suffix == ".xz":
        return lzma.compress(data, check=lzma.CHECK_CRC32)
    if suffix == ".gz":
        return gzip.compress(data)
    if suffix == ".zst":
        if shutil.which("zstd") is None:
            raise RuntimeError("zstd not installed")
        return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout
    return data


def fake_modules_tree(root: Path, release: str = "9.9.9-test", *, suffixes: tuple[str, ...] = (".xz",),
                      modules: tuple = FAKE_MODULES, builtin: tuple[str, ...] = (),
                      with_dep: bool = False) -> Path:
    """Write ``root/lib/modules/<release>`` with fake modules (compression cycling through ``suffixes``).

    ``builtin`` names go to modules.builtin instead of being files; ``with_dep`` also writes modules.dep
    (otherwise hvlab has to generate it from .modinfo, as for Debian's packages).
    """
    mdir = root / "lib" / "modules" / release
    mdir.mkdir(parents=True, exist_ok=True)
    dep_lines = []
    builtin_lines = []
    rel_of: dict[str, str] = {}
    i = 0
    for name, deps, sub in modules:
        if name.replace("-", "_") in {b.replace("-", "_") for b in builtin}:
            builtin_lines.append(f"kernel/{sub}/{name}.ko\n")
            continue
        suffix = suffixes[i % len(suffixes)]
        i += 1
        rel = f"kernel/{sub}/{name}.ko{suffix}"
        (mdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (mdir / rel).write_bytes(compress(make_ko(name, deps, (f"fake:{name}*",)), suffix))
        rel_of[name.replace("-", "_")] = rel
    for name, deps, _sub in modules:
        n = name.replace("-", "_")
        if n in rel_of:
            dep_lines.append(f"{rel_of[n]}: {' '.join(rel_of[d] for d in deps if d in rel_of)}\n")
    (mdir / "modules.builtin").write_text("".join(builtin_lines))
    if with_dep:
        (mdir / "modules.dep").write_text("".join(dep_lines))
    return mdir


def fake_kernel(root: Path, release: str = "9.9.9-test", **kw: object) -> Kernel:
    """A Kernel with a fake (unbootable) vmlinuz and a fake modules tree under ``root``."""
    mdir = fake_modules_tree(root, release, **kw)  # type: ignore[arg-type]
    vmlinuz = root / "boot" / f"vmlinuz-{release}"
    vmlinuz.parent.mkdir(parents=True, exist_ok=True)
    vmlinuz.write_bytes(b"not a kernel")
    return Kernel(label="fake", release=release, vmlinuz=vmlinuz, modules_dir=mdir, flavour="custom")

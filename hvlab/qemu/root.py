"""A QEMU >= 10.1 (for vfio-user-pci) without touching the host: Debian trixie-backports' qemu-system-x86
in a debootstrapped trixie root under hvlab's cache.

Why a root: Debian 12 ships QEMU 7.2, which has no vfio-user client; trixie-backports has 11.1. Installing
it on the host would change the host; instead ``debootstrap`` makes a minimal trixie tree and apt runs
inside it with a private state (its own sources list, lists and archive cache under
``/var/lib/hvlab-apt`` of the root, passed with ``-o Dir::...``), so neither the host's apt configuration
nor the root's own is modified. Built once (about 30 s), reused until deleted.

QEMU runs from the root through the root's own dynamic loader (``ld.so --library-path``) rather than
chroot, so every path (sockets, kernel, logs) is a host path; ``-L`` and ``QEMU_MODULE_DIR`` point QEMU at
the root's firmware and modules instead of the host's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from hvlab import paths, progress
from hvlab.errors import HvlabError
from hvlab.guest import apt

SUITE = "trixie"
BACKPORTS = "trixie-backports"
PACKAGES = ("qemu-system-x86",)
MARKER = ".hvlab-qemu-root"
APT_DIR = "var/lib/hvlab-apt"  # inside the root
MIN_VERSION = (10, 1)


def root_dir() -> Path:
    return paths.cache_subdir("qemu") / f"{SUITE}-root"


class QemuRoot:
    """The cached root; ``ensure()`` builds it when missing."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or root_dir()

    # ------------------------------------------------------------------ layout
    @property
    def ready(self) -> bool:
        return (self.path / MARKER).exists() and self.binary.exists()

    @property
    def binary(self) -> Path:
        return self.path / "usr/bin/qemu-system-x86_64"

    @property
    def loader(self) -> Path:
        return self.path / "lib64/ld-linux-x86-64.so.2"

    def library_path(self) -> str:
        return ":".join(str(self.path / d) for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"))

    def command(self) -> list[str]:
        """argv prefix that runs the root's qemu-system-x86_64 on this host."""
        loader = (self.path / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
        return [str(loader), "--library-path", self.library_path(), str(self.binary),
                "-L", str(self.path / "usr/share/qemu"), "-L", str(self.path / "usr/share/seabios")]

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e["QEMU_MODULE_DIR"] = str(self.path / "usr/lib/x86_64-linux-gnu/qemu")
        return e

    def version(self) -> str:
        out = subprocess.run([*self.command(), "--version"], capture_output=True, text=True, env=self.env())
        if out.returncode != 0:
            raise HvlabError(f"the QEMU in {self.path} does not run: {out.stderr.strip()[-300:]}")
        return out.stdout.split("\n")[0].strip()

    def version_tuple(self) -> tuple[int, int]:
        words = self.version().split()
        v = words[words.index("version") + 1]
        major, minor = v.split(".")[:2]
        return int(major), int(minor)

    # ------------------------------------------------------------------ build
    def ensure(self) -> QemuRoot:
        """Build the root if it is not there yet (with progress lines); returns self."""
        if self.ready:
            return self
        with apt.locked(self.path.parent / f"{self.path.name}.lock"):
            if not self.ready:
                self._build()
        return self

    def _build(self) -> None:
        if os.geteuid() != 0:
            raise HvlabError("building the QEMU root needs root (debootstrap and chroot); run once as root "
                             f"or provide {self.path}")
        for tool in ("debootstrap", "chroot"):
            if shutil.which(tool) is None:
                raise HvlabError(f"{tool} is needed to build the QEMU root (apt-get install debootstrap)")
        archive, _security = apt.host_mirrors()
        tmp = self.path.with_name(self.path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with progress.step(f"debootstrap {SUITE} (minbase) into {tmp}"):
            self._run(["debootstrap", "--variant=minbase", SUITE, str(tmp), archive], "debootstrap")
        state = tmp / APT_DIR
        for d in ("lists/partial", "cache/archives/partial"):
            (state / d).mkdir(parents=True, exist_ok=True)
        (state / "sources.list").write_text(
            f"deb [signed-by={apt.KEYRING}] {archive} {SUITE} main\n"
            f"deb [signed-by={apt.KEYRING}] {archive} {BACKPORTS} main\n")
        opts = self._apt_options()
        with progress.step(f"installing {' '.join(PACKAGES)} from {BACKPORTS} into the root"):
            self._run(["chroot", str(tmp), "apt-get", "-q", *opts, "update"], "apt-get update")
            self._run(["chroot", str(tmp), "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q", "-y",
                       *opts, "install", "--no-install-recommends", "-t", BACKPORTS, *PACKAGES],
                      "apt-get install")
            self._run(["chroot", str(tmp), "apt-get", *opts, "clean"], "apt-get clean")
        shutil.rmtree(self.path, ignore_errors=True)
        tmp.rename(self.path)
        (self.path / MARKER).write_text(" ".join(PACKAGES) + f" from {BACKPORTS}\n")
        v = self.version_tuple()
        if v < MIN_VERSION:
            raise HvlabError(f"{BACKPORTS} gave QEMU {v[0]}.{v[1]}; vfio-user-pci needs >= 10.1")
        progress.say(f"QEMU root ready: {self.version()} ({_du(self.path)} MB in {self.path})")

    @staticmethod
    def _apt_options() -> list[str]:
        base = "/" + APT_DIR
        opts = {
            "Dir::Etc::SourceList": f"{base}/sources.list",
            "Dir::Etc::SourceParts": "/dev/null",
            "Dir::State::Lists": f"{base}/lists",
            "Dir::Cache": f"{base}/cache",
            "Acquire::Languages": "none",
        }
        return [x for k, v in opts.items() for x in ("-o", f"{k}={v}")]

    @staticmethod
    def _run(cmd: list[str], what: str) -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise HvlabError(f"{what} failed while building the QEMU root:\n{tail}")


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total >> 20

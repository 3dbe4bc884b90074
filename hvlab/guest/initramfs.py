"""Guest initramfs images: busybox, the modules a test needs, an /init, and nothing else.

hvlab boots its guests straight into an initramfs (no disk image), so the image is the guest's whole
userspace.  It is written here as a newc cpio in Python (no cpio/gen_init_cpio needed), gzip-compressed
(every kernel config hvlab targets can unpack gzip), and cached by the hash of everything that goes in,
so that a test session that boots many guests builds it once.

Layout of an image::

    /init                              the caller's init (0755)
    /bin/busybox + applet symlinks     from Debian's busybox-static
    /lib/modules/<release>/...         the requested modules and their dependencies, decompressed
                                       (busybox insmod cannot decompress), with modules.dep (for busybox
                                       modprobe), modules.builtin, and hvlab.modules: the load order, one
                                       relative path per line, which hvlab's /init feeds to insmod
    /etc/hvlab-modules                 the same order as absolute paths, required modules only ...
    /etc/hvlab-optional-modules        ... and the optional ones found (loaded after the required)
    /dev/console, /dev/null            so that init has a console before devtmpfs is mounted
    extra files                        ``files={"/path": bytes}``; 0755 if they start with #! or ELF
    /usr/sbin/<name> + shared libs     ``binaries=["ip", "ethtool"]``: host binaries with their ldd closure
                                       (libraries at the paths ldd reports, plus the dynamic loader); a
                                       busybox applet of the same name becomes a symlink to the real one
    /usr/bin/hvlab-udp                 (default guest) the static flow tool built from files/udpflow.c
    /etc/hvlab/profile                 (default guest) shell functions sourced before agent commands
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hvlab import paths, progress
from hvlab.errors import HvlabError, NotFound
from hvlab.guest import apt
from hvlab.guest.kernels import Kernel, require_drivers
from hvlab.guest.modules import ModuleFile, ModuleIndex, format_modules_dep

FORMAT = 2  # bump when the layout changes, so that cached images are rebuilt

GUEST_MODULES = ("hv_vmbus", "hv_netvsc", "pci_hyperv")
#: Host binaries copied into the default guest (with their libraries) so tests can inspect NICs.
GUEST_BINARIES = ("ip", "ethtool")
#: Sourced before each agent command: makes `ip` the real iproute2 (busybox sh prefers its applets).
GUEST_PROFILE = "/etc/hvlab/profile"
#: Where the guest's flow tool goes (see hvlab/guest/files/udpflow.c and hvlab/net/traffic.py).
UDP_TOOL_PATH = "/usr/bin/hvlab-udp"
GUEST_OPTIONAL_MODULES = ("hv_utils", "vmxnet3")

S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000

# --------------------------------------------------------------------------------------------------
# newc cpio


class CpioWriter:
    """Builds a newc ("070701") archive in memory, the format the kernel's initramfs unpacker reads.

    Parent directories are added automatically; timestamps are 0 so that equal inputs give equal bytes.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 1
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", *, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/")
        if name in self._names:
            raise ValueError(f"duplicate cpio entry {name!r}")
        self._names.add(name)
        raw = name.encode() + b"\0"
        fields = [self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0]
        self._ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._chunks += [hdr, raw, b"\0" * (-(len(hdr) + len(raw)) % 4), data, b"\0" * (-len(data) % 4)]

    def _parents(self, name: str) -> None:
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._names:
                self._entry(d, S_IFDIR | 0o755, nlink=2)

    def has(self, name: str) -> bool:
        return name.strip("/") in self._names

    def dir(self, name: str, mode: int = 0o755) -> None:
        self._parents(name)
        if not self.has(name):
            self._entry(name, S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(name)
        self._entry(name, S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._parents(name)
        self._entry(name, S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parents(name)
        self._entry(name, S_IFCHR | mode, rdev=(major, minor))

    def getvalue(self) -> bytes:
        trailer = CpioWriter()
        trailer._ino = 0
        trailer._entry("TRAILER!!!", 0, nlink=1)
        return b"".join(self._chunks + trailer._chunks)


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int
    data: bytes
    rdev: tuple[int, int] = (0, 0)

    @property
    def is_dir(self) -> bool:
        return self.mode & 0o170000 == S_IFDIR

    @property
    def is_file(self) -> bool:
        return self.mode & 0o170000 == S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.mode & 0o170000 == S_IFLNK


def read_cpio(blob: bytes) -> dict[str, CpioEntry]:
    """Parse a newc archive (gzip or plain) back into {name: entry}: for tests and `hvlab kernel` debugging."""
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    out: dict[str, CpioEntry] = {}
    off = 0
    while off < len(blob):
        if blob[off: off + 6] != b"070701":
            raise ValueError(f"bad cpio magic at {off}")
        f = [int(blob[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name_start = off + 110
        name = blob[name_start: name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        data = blob[data_start: data_start + size]
        off = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            break
        out[name] = CpioEntry(name, mode, data, (f[9], f[10]))
    return out


# --------------------------------------------------------------------------------------------------
# busybox


def _is_static_elf(path: Path) -> bool:
    """True for an x86-64 ELF executable without a PT_INTERP (dynamic loader) program header."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:
                return False
            e_phoff, = struct.unpack_from("<Q", head, 0x20)
            e_phentsize, e_phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(e_phoff)
            ph = f.read(e_phentsize * e_phnum)
    except OSError:
        return False
    return all(struct.unpack_from("<I", ph, i * e_phentsize)[0] != 3 for i in range(e_phnum))


def busybox_path() -> Path:
    """A static busybox: the host's (package busybox-static) if it is one, else Debian's fetched into the cache.

    A dynamically linked busybox (package ``busybox``) would need a libc in the image, so it is not used.
    """
    for p in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if p.exists() and _is_static_elf(p):
            return p.resolve()
    return fetch_busybox()


def fetch_busybox(pkg_apt: apt.PrivateApt | None = None) -> Path:
    """trixie's busybox-static unpacked under ``<cache>/busybox/<version>/`` (once), via the private apt state."""
    cached = sorted(paths.cache_subdir("busybox").glob("*/bin/busybox"))
    if cached:
        return cached[-1]
    with apt.locked(paths.cache_subdir("busybox") / ".lock"):
        cached = sorted(paths.cache_subdir("busybox").glob("*/bin/busybox"))
        if cached:  # fetched by another process while we waited
            return cached[-1]
        pa = pkg_apt or apt.PrivateApt()
        pa.update()
        recs = [r for r in pa.records()
                if r.name == "busybox-static" and r.suite in apt.SUITE_GROUPS["trixie"]]
        if not recs:
            raise NotFound("busybox-static is neither installed (apt-get install busybox-static) "
                           "nor in the package lists")
        rec = max(recs, key=lambda r: apt.VersionKey(r.version))
        dest = paths.cache_subdir("busybox", rec.version.replace(":", "_"))
        with progress.step(f"fetching busybox-static {rec.version}"):
            debs = pa.download([rec], dest / "deb")
            apt.extract_deb(debs[rec.name], dest / "root")
        for cand in (dest / "root/bin/busybox", dest / "root/usr/bin/busybox"):
            if cand.exists():
                (dest / "bin").mkdir(exist_ok=True)
                os.replace(cand, dest / "bin/busybox")
                shutil.rmtree(dest / "deb", ignore_errors=True)
                shutil.rmtree(dest / "root", ignore_errors=True)
                return dest / "bin/busybox"
    raise NotFound(f"busybox-static {rec.version} has no bin/busybox")


# A fallback when busybox cannot be run here to list its applets (e.g. a foreign-arch host).
_FALLBACK_APPLETS = ["bin/sh", "bin/ash", "bin/cat", "bin/echo", "bin/ls", "bin/mkdir", "bin/mount", "bin/umount", "bin/sleep", "bin/dmesg", "bin/ip", "bin/base64", "bin/ps", "bin/kill", "bin/ln", "bin/rm", "bin/cp", "bin/mv", "bin/uname", "bin/sync", "bin/grep", "bin/sed", "sbin/insmod", "sbin/rmmod", "sbin/modprobe", "sbin/lsmod", "sbin/poweroff", "sbin/reboot", "sbin/halt", "sbin/ifconfig", "sbin/mdev", "usr/bin/env", "usr/bin/head", "usr/bin/tail", "usr/bin/tr", "usr/bin/wc", "usr/bin/awk", "usr/bin/xargs", "usr/bin/timeout", "usr/bin/setsid", "usr/bin/find", "usr/bin/hexdump", "usr/bin/stat", "usr/bin/test", "usr/bin/["]


def busybox_applets(busybox: Path) -> list[str]:
    try:
        out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, timeout=10)
        applets = [a for a in out.stdout.split() if a and not a.endswith("/busybox")]
        if out.returncode == 0 and applets:
            return applets
    except (OSError, subprocess.TimeoutExpired):
        pass
    return list(_FALLBACK_APPLETS)


# --------------------------------------------------------------------------------------------------
# Host binaries with their shared libraries, and the guest's flow tool

_SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def host_binary(name: str | os.PathLike[str]) -> Path:
    """A host executable by name (searched in the sbin and bin directories too) or path; NotFound if absent."""
    found = shutil.which(str(name), path=_SEARCH_PATH) if os.sep not in str(name) else str(name)
    if not found or not Path(found).is_file():
        raise NotFound(f"{name} is not installed here (scripts/install.sh installs iproute2 and ethtool)")
    return Path(found)


def ldd_closure(binary: Path) -> list[str]:
    """The absolute paths of every shared library ``binary`` loads, the dynamic loader included, as ldd lists
    them (the vDSO excluded); [] for a static binary. NotFound names a library ldd cannot find."""
    if _is_static_elf(binary):
        return []
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        if "not a dynamic executable" in out.stdout + out.stderr:
            return []
        raise HvlabError(f"ldd {binary} failed: {out.stderr.strip() or out.stdout.strip()}")
    libs: list[str] = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            name, _, rest = line.partition("=>")
            target = rest.strip().split(" (")[0].strip()
            if target == "not found":
                raise NotFound(f"{binary} needs {name.strip()}, which ldd cannot find")
            if target.startswith("/"):
                libs.append(target)
        elif line.startswith("/"):  # the dynamic loader: "/lib64/ld-linux-x86-64.so.2 (0x...)"
            libs.append(line.split(" (")[0].strip())
    return list(dict.fromkeys(libs))


def binary_files(names: Iterable[str | os.PathLike[str]]) -> tuple[dict[str, bytes], dict[str, str]]:
    """({image path: bytes} for the binaries and their libraries, {basename: image path} of the binaries).

    Binaries go to usr/sbin/<basename>, and a busybox applet of the same name is made a symlink to them
    (busybox sh still runs its own applet first: /etc/hvlab/profile covers that). Libraries go to the path
    ldd reports, read through symlinks, which is where the loader looks for them by soname.
    """
    out: dict[str, bytes] = {}
    names_map: dict[str, str] = {}
    for name in names:
        path = host_binary(name)
        dest = f"usr/sbin/{path.name}"
        out[dest] = path.read_bytes()
        names_map[path.name] = dest
        for lib in ldd_closure(path):
            out.setdefault(lib.lstrip("/"), Path(lib).read_bytes())
    return out, names_map


def udp_tool() -> Path | None:
    """The guest's flow tool, compiled with ``gcc -static`` once per source/compiler and cached by content
    under ``<cache>/guest-tools/``. None (with a warning) when there is no gcc here; a compile error raises."""
    src = guest_file("udpflow.c").encode()
    gcc = shutil.which("gcc")
    if gcc is None:
        progress.say("no gcc here (apt-get install gcc libc6-dev): the guest gets no hvlab-udp flow tool")
        return None
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    key = _sha(src + version.encode())[:24]
    out = paths.cache_subdir("guest-tools", key) / "hvlab-udp"
    if out.exists():
        return out
    with progress.step("compiling the guest's hvlab-udp (gcc -static)"):
        tmp_src = out.with_name(f"udpflow.{os.getpid()}.c")
        tmp_src.write_bytes(src)
        tmp = out.with_name(f"hvlab-udp.tmp{os.getpid()}")
        r = subprocess.run([gcc, "-static", "-O2", "-s", "-Wall", "-o", str(tmp), str(tmp_src)],
                           capture_output=True, text=True, timeout=300)
        tmp_src.unlink(missing_ok=True)
        if r.returncode != 0:
            raise HvlabError(f"gcc -static failed for udpflow.c (is libc6-dev installed?):\n{r.stderr.strip()}")
        os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------------------
# Building


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_mode(data: bytes) -> int:
    return 0o755 if data[:2] == b"#!" or data[:4] == b"\x7fELF" else 0o644


def _gather(kernel: Kernel, modules: Iterable[str], optional: Iterable[str]) -> tuple[list[ModuleFile], ModuleIndex | None]:
    modules, optional = list(modules), list(optional)
    if kernel.modules_dir is None:
        if modules:
            raise NotFound(f"kernel {kernel.vmlinuz} has no modules tree but modules were asked for: "
                           f"{', '.join(modules)} (pass --modules DIR)")
        return [], None
    idx = ModuleIndex.load(kernel.modules_dir)
    return idx.closure(modules, optional=optional), idx


def _required_count(kernel: Kernel, modules: Iterable[str]) -> int:
    """How many of the closure's leading entries the required modules account for (the rest is optional)."""
    if kernel.modules_dir is None:
        return 0
    return len(ModuleIndex.load(kernel.modules_dir).closure(list(modules)))


def build(kernel: Kernel, *, modules: list[str], init: str, files: dict[str, bytes] | None = None,
          optional_modules: Iterable[str] = (), binaries: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Build (or reuse) an initramfs for ``kernel``; returns the path of the gzip'd newc cpio.

    ``modules`` must exist (as modules or built in) or NotFound is raised; ``optional_modules`` are added
    with their dependencies if present; ``binaries`` are host executables copied with their libraries
    (NotFound if one is missing).  The cache key covers the module contents, init, files, binaries,
    libraries, busybox and the layout version, so any change gives a new image and a repeat is instant.
    """
    files = dict(files or {})
    bin_files, bin_names = binary_files(binaries)
    mods, idx = _gather(kernel, modules, optional_modules)
    bb = busybox_path()
    bb_data = bb.read_bytes()
    key_src = {
        "format": FORMAT,
        "release": kernel.release,
        "modules": [(m.relpath, _sha(m.path.read_bytes())) for m in mods],
        "builtin": sorted(idx.builtin) if idx else [],
        "init": _sha(init.encode()),
        "files": sorted((k, _sha(v)) for k, v in files.items()),
        "busybox": _sha(bb_data),
    }
    if bin_files:  # only when used, so that images without binaries keep their keys
        key_src["binaries"] = sorted((k, _sha(v)) for k, v in bin_files.items())
    key = _sha(json.dumps(key_src, sort_keys=True).encode())[:24]
    out_dir = paths.cache_subdir("initramfs")
    out = out_dir / f"{key}.cpio.gz"
    if out.exists():
        os.utime(out)  # keeps it from being pruned while in use
        return out
    _prune(out_dir)

    with progress.step(f"building initramfs for {kernel.release} ({len(mods)} modules)"):
        w = CpioWriter()
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "etc", "root"):
            w.dir(d)
        w.chardev("dev/console", 5, 1)
        w.chardev("dev/null", 1, 3, 0o666)
        w.file("init", init.encode(), 0o755)
        w.file("bin/busybox", bb_data, 0o755)
        for name, data in sorted(bin_files.items()):
            w.file(name, data, 0o755 if name in bin_names.values() or ".so" in name else 0o644)
        for applet in busybox_applets(bb):
            real = bin_names.get(applet.rsplit("/", 1)[-1])
            if not w.has(applet):
                w.symlink(applet, f"/{real}" if real else "/bin/busybox")

        moddir = f"lib/modules/{kernel.release}"
        w.dir(moddir)
        dep_lines: dict[str, list[str]] = {}
        included = {m.name: m for m in mods}
        for m in mods:
            w.file(f"{moddir}/{m.plain_relpath}", m.read(), 0o644)
            dep_lines[m.plain_relpath] = [included[d].plain_relpath for d in m.deps if d in included]
        w.file(f"{moddir}/modules.dep", format_modules_dep(dep_lines).encode())
        if kernel.modules_dir is not None:
            for name in ("modules.builtin", "modules.order", "modules.builtin.modinfo"):
                src = kernel.modules_dir / name
                if src.exists():
                    w.file(f"{moddir}/{name}", src.read_bytes())
        w.file(f"{moddir}/hvlab.modules", "".join(f"{m.plain_relpath}\n" for m in mods).encode())
        # The same order as absolute paths, split into required and optional, for inits that prefer it
        # (the nested runner's L1 init reads these).
        n_req = _required_count(kernel, modules)
        w.file("etc/hvlab-modules", "".join(f"/{moddir}/{m.plain_relpath}\n" for m in mods[:n_req]).encode())
        w.file("etc/hvlab-optional-modules",
               "".join(f"/{moddir}/{m.plain_relpath}\n" for m in mods[n_req:]).encode())

        for name, data in sorted(files.items()):
            name = name.strip("/")
            if w.has(name):
                raise HvlabError(f"initramfs file {name!r} clashes with one hvlab puts there")
            w.file(name, data, _file_mode(data))

        blob = gzip.compress(w.getvalue(), compresslevel=6, mtime=0)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, out)
    progress.say(f"initramfs {out} ({len(blob) / 1e6:.1f} MB)")
    return out


#: Images unused for this long are deleted when a new one is built (each test variation makes one).
PRUNE_AGE = 14 * 86400


def _prune(out_dir: Path) -> None:
    cutoff = time.time() - PRUNE_AGE
    for f in out_dir.glob("*.cpio.gz"):
        try:
            if f.stat().st_mtime < cutoff:
                f.unlink()
        except OSError:
            pass


def guest_file(name: str) -> str:
    """A file shipped in ``hvlab/guest/files/`` (the default init and agent)."""
    return resources.files("hvlab.guest").joinpath("files", name).read_text()


def build_guest_initramfs(kernel: Kernel, extra_modules: Iterable[str] = (),
                          files: dict[str, bytes] | None = None) -> Path:
    """The default hvlab guest: Hyper-V drivers (+ hv_utils, vmxnet3 if present), hvlab's init and agent,
    iproute2's ip and ethtool with their libraries, and the hvlab-udp flow tool."""
    require_drivers(kernel)
    from hvlab.agent.host import FILES as AGENT_FILES

    all_files = {"/hvlab/agent": (AGENT_FILES / "hvlab-agent").read_bytes(),
                 GUEST_PROFILE: guest_file("profile").encode()}
    tool = udp_tool()
    if tool is not None:
        all_files[UDP_TOOL_PATH] = tool.read_bytes()
    all_files.update(files or {})
    binaries = []
    for name in GUEST_BINARIES:  # inspection tools are a convenience: a host without them still boots guests
        try:
            host_binary(name)
            binaries.append(name)
        except NotFound as e:
            progress.say(f"{e}; the guest falls back to busybox's")
    return build(kernel, modules=[*GUEST_MODULES, *extra_modules], init=guest_file("init"),
                 files=all_files, optional_modules=GUEST_OPTIONAL_MODULES, binaries=binaries)

"""Guest kernels: Debian's packaged kernels fetched into the cache, or a developer's own build.

Labels name what a test wants, not an exact build: ``6.1`` (bookworm's cloud kernel), ``6.12``
(trixie's), ``7.3`` or any other series newer than 6.12 (trixie-backports'), ``l1-6.12`` (trixie's
generic amd64 kernel, for the nested runner's L1 VM, which needs 9p, overlay and kvm_amd modules that the
cloud flavour lacks).  The newest package of the series is resolved when the label is first fetched and
then stays fixed in the cache (``<cache>/kernels/<label>/kernel.json`` records exactly what was taken), so
that test runs are repeatable until someone fetches again with ``--refresh``.

How Debian packages a kernel changed in 2026: up to 6.x a ``linux-image-<abi>-<flavour>`` package holds
both vmlinuz and modules; newer trixie-backports kernels split it into ``linux-base-*`` (modules.builtin,
config), ``linux-binary-*`` (vmlinuz) and ``linux-modules-*``, with ``linux-image-*`` an empty package that
depends on them.  Selection therefore follows the image package's dependencies on same-ABI ``linux-*``
packages instead of assuming a layout.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from hvlab import paths, progress
from hvlab.errors import HvlabError, NotFound
from hvlab.guest import apt
from hvlab.guest.modules import ModuleIndex, normalize, write_index

DEFAULT_LABEL = "6.12"
REQUIRED_DRIVERS = ("hv_vmbus", "hv_netvsc", "pci_hyperv")
CLOUD = "cloud-amd64"
GENERIC = "amd64"


@dataclass
class Kernel:
    """A bootable kernel and (unless everything is built in) its modules tree."""

    label: str
    release: str
    vmlinuz: Path
    modules_dir: Path | None  # .../lib/modules/<release>
    flavour: str  # "cloud-amd64" | "amd64" | "custom"
    info: dict = field(default_factory=dict, repr=False)  # kernel.json for fetched kernels

    def index(self) -> ModuleIndex | None:
        return ModuleIndex.load(self.modules_dir) if self.modules_dir else None

    def driver_status(self, names: tuple[str, ...] = REQUIRED_DRIVERS) -> dict[str, str | None]:
        """{name: "builtin" | "module" | None}; None for all when there is no modules tree to tell."""
        idx = self.index()
        return {normalize(n): (idx.status(n) if idx else None) for n in names}


# --------------------------------------------------------------------------------------------------
# Labels -> what to look for


@dataclass(frozen=True)
class LabelSpec:
    """What a label selects: a kernel series (or an exact ABI) of one flavour from a group of suites."""

    label: str
    series: str | None  # "6.1", "7.3", "7" (any 7.x); None when abi is given
    flavour: str
    group: str  # key of apt.SUITE_GROUPS
    abi: str | None = None  # exact, e.g. "7.3.4+deb13"


_RELEASE_RE = re.compile(r"^(?P<abi>\d+\.\d+(?:\.\d+)*(?:-\d+|\+[a-z]+[0-9.]*)*)-(?P<flavour>cloud-amd64|amd64)$")


def _group_for_series(series: str) -> str:
    parts = [int(x) for x in series.split(".")]
    if parts[:2] == [6, 1]:
        return "bookworm"
    if parts[:2] == [6, 12]:
        return "trixie"
    return "trixie-backports"


def parse_label(label: str) -> LabelSpec:
    """Map a user's label to a LabelSpec; raises HvlabError for labels hvlab cannot serve."""
    lab = label.strip()
    m = _RELEASE_RE.match(lab)
    if m:  # an exact release string, e.g. 7.3.4+deb13-cloud-amd64
        abi = m.group("abi")
        series = ".".join(abi.split(".")[:2]).split("-")[0].split("+")[0]
        return LabelSpec(lab, None, m.group("flavour"), _group_for_series(series), abi=abi)
    flavour = CLOUD
    body = lab
    if lab.startswith("l1-"):
        flavour, body = GENERIC, lab[3:]
    if re.fullmatch(r"\d+(\.x)?", body):  # "7" or "7.x": the newest 7.x
        series = body.split(".")[0]
        if int(series) < 7:
            raise NotFound(f"kernel label {label!r}: say 6.1 or 6.12 for 6.x kernels")
        return LabelSpec(lab, series, flavour, "trixie-backports")
    if re.fullmatch(r"\d+\.\d+", body):
        return LabelSpec(lab, body, flavour, _group_for_series(body))
    raise NotFound(
        f"unknown kernel label {label!r}: use 6.1, 6.12, 7.3 (or another series in trixie-backports), "
        f"l1-6.12, an exact release such as 6.12.118+deb13-cloud-amd64, or --kernel PATH")


# --------------------------------------------------------------------------------------------------
# Package selection (pure: a function of the index records)


@dataclass(frozen=True)
class Selection:
    release: str  # uname -r, e.g. 6.12.118+deb13-cloud-amd64
    abi: str
    version: str  # Debian version of the image package
    image: apt.Package
    packages: tuple[apt.Package, ...]  # what to download and unpack (image first)


def _image_re(spec: LabelSpec, series_re: str | None = None) -> re.Pattern[str]:
    flav = re.escape(spec.flavour)
    if spec.abi is not None and series_re is None:
        return re.compile(rf"^linux-image-(?P<abi>{re.escape(spec.abi)})-{flav}$")
    series = series_re or re.escape(spec.series or "")
    tail = r"(?:\.[0-9]+)*" if "." in (spec.series or "") else r"(?:\.[0-9]+)+"
    # abi: series, more dotted numbers, then Debian's "-56" or "+deb13" / "+deb13.1" / "+bpo" suffixes.
    return re.compile(rf"^linux-image-(?P<abi>{series}{tail}(?:-[0-9]+|\+[a-z]+[0-9.]*)*)-{flav}$")


def select_packages(records: list[apt.Package], spec: LabelSpec) -> Selection:
    """The newest kernel matching ``spec`` and the packages that make it up.

    The image package is the newest-versioned ``linux-image-<abi>-<flavour>`` of the label's series in
    the label's suites; then its Depends are followed through same-ABI ``linux-(image|binary|modules|base)``
    packages (the 2026 split layout) at the same version.
    """
    suites = set(apt.SUITE_GROUPS[spec.group])
    pattern = _image_re(spec)
    candidates = [r for r in records if r.suite in suites and pattern.match(r.name)]
    if not candidates:
        any_series = _image_re(spec, series_re=r"[0-9]+")
        found = sorted({r.version: r for r in records if r.suite in suites and any_series.match(r.name)}.values(),
                       key=lambda r: apt.VersionKey(r.version))
        available = [r.name.removeprefix("linux-image-") for r in found]
        hint = f"; {spec.group} has: {', '.join(available[-8:])}" if available else ""
        raise NotFound(f"no {spec.flavour} kernel for {spec.label!r} in {', '.join(sorted(suites))}{hint}")
    image = max(candidates, key=lambda r: apt.VersionKey(r.version))
    m = pattern.match(image.name)
    assert m
    abi = m.group("abi")
    release = f"{abi}-{spec.flavour}"
    part_re = re.compile(rf"^linux-(image|binary|modules|base)-{re.escape(abi)}-{re.escape(spec.flavour)}$")
    by_name = {(r.name, r.version): r for r in records}
    chosen: list[apt.Package] = [image]
    todo = [image]
    while todo:
        pkg = todo.pop()
        for dep in pkg.depends_names():
            if not part_re.match(dep) or any(c.name == dep for c in chosen):
                continue
            rec = by_name.get((dep, image.version))
            if rec is None:
                raise NotFound(f"{image.name} {image.version} depends on {dep} {image.version}, "
                               "which the package lists do not have")
            chosen.append(rec)
            todo.append(rec)
    return Selection(release, abi, image.version, image, tuple(chosen))


# --------------------------------------------------------------------------------------------------
# The cache


def kernels_dir() -> Path:
    return paths.cache_subdir("kernels")


def _safe_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", label)


def _from_json(d: Path) -> Kernel | None:
    meta_file = d / "kernel.json"
    if not meta_file.exists():
        return None
    meta = json.loads(meta_file.read_text())
    mod = meta.get("modules_dir")
    return Kernel(label=meta["label"], release=meta["release"], vmlinuz=d / meta["vmlinuz"],
                  modules_dir=(d / mod) if mod else None, flavour=meta["flavour"], info=meta)


def cached(label: str) -> Kernel | None:
    """The cached kernel for ``label`` (or whose exact release is ``label``), or None."""
    k = _from_json(kernels_dir() / _safe_label(label))
    if k is not None:
        return k
    for k in list_cached():
        if k.release == label:
            return k
    return None


def list_cached() -> list[Kernel]:
    out = []
    for d in sorted(kernels_dir().iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            k = _from_json(d)
            if k is not None:
                out.append(k)
    return out


def _find_one(root: Path, patterns: list[str], what: str) -> Path:
    for pat in patterns:
        hits = sorted(root.glob(pat))
        if hits:
            return hits[0]
    raise NotFound(f"the unpacked packages have no {what} (looked for {', '.join(patterns)})")


def fetch(label: str, *, refresh: bool = False, pkg_apt: apt.PrivateApt | None = None) -> Kernel:
    """Fetch the kernel for ``label`` into the cache (instant if already there, unless ``refresh``)."""
    spec = parse_label(label)
    dest = kernels_dir() / _safe_label(spec.label)
    if not refresh:
        k = _from_json(dest)
        if k is not None:
            return k
    with apt.locked(kernels_dir() / ".fetch.lock"):
        if not refresh:  # another process may have fetched it while we waited
            k = _from_json(dest)
            if k is not None:
                return k
        return _fetch_locked(spec, dest, pkg_apt)


def _fetch_locked(spec: LabelSpec, dest: Path, pkg_apt: apt.PrivateApt | None) -> Kernel:
    t0 = time.monotonic()
    pa = pkg_apt or apt.PrivateApt()
    updated = pa.update()
    try:
        sel = select_packages(pa.records(), spec)
    except NotFound:
        if updated:
            raise
        pa.update(force=True)  # the lists may predate the series
        sel = select_packages(pa.records(), spec)
    old = _from_json(dest)
    if old is not None and old.release == sel.release and old.info.get("version") == sel.version:
        progress.say(f"kernel {spec.label}: {sel.release} ({sel.version}) is still the newest; keeping it")
        return old
    progress.say(f"kernel {spec.label}: {sel.release} ({sel.version}) from {sel.image.suite}: "
                 + ", ".join(p.name for p in sel.packages))

    work = kernels_dir() / f".tmp-{_safe_label(spec.label)}"
    shutil.rmtree(work, ignore_errors=True)
    debs_dir, root = work / "debs", work / "root"
    try:
        size = sum(p.size for p in sel.packages) / 1e6
        with progress.step(f"downloading {len(sel.packages)} package(s), {size:.0f} MB"):
            try:
                debs = pa.download(sel.packages, debs_dir)
            except HvlabError as exc:  # a stale list can name a file the mirror has dropped
                progress.say(f"download failed ({exc}); refreshing the lists and retrying once")
                pa.update(force=True)
                sel = select_packages(pa.records(), spec)
                debs = pa.download(sel.packages, debs_dir)
        with progress.step("unpacking"):
            for deb in debs.values():
                apt.extract_deb(deb, root)
        rel = sel.release
        vmlinuz = _find_one(root, [f"boot/vmlinuz-{rel}", f"usr/lib/modules/{rel}/vmlinuz",
                                   f"lib/modules/{rel}/vmlinuz"], "vmlinuz")
        modules_dir = _find_one(root, [f"usr/lib/modules/{rel}", f"lib/modules/{rel}"], "modules directory")
        with progress.step("indexing modules (modules.dep, modules.alias)"):
            idx = write_index(modules_dir)
        drivers = {n: idx.status(n) for n in (*REQUIRED_DRIVERS, "hv_utils", "vmxnet3")}
        lacking = [n for n in REQUIRED_DRIVERS if drivers[n] is None]
        if lacking:
            progress.say(f"warning: {rel} lacks {', '.join(lacking)}; hvlab's tests cannot use it")
        meta = {
            "label": spec.label,
            "release": rel,
            "flavour": spec.flavour,
            "series": spec.series or ".".join(sel.abi.split(".")[:2]),
            "version": sel.version,
            "suite": sel.image.suite,
            "mirror": pa.mirrors[0],
            "packages": [{"name": p.name, "version": p.version, "suite": p.suite, "filename": p.filename,
                          "size": p.size, "sha256": apt.sha256_file(debs[p.name])} for p in sel.packages],
            "vmlinuz": vmlinuz.relative_to(root).as_posix(),
            "vmlinuz_sha256": apt.sha256_file(vmlinuz),
            "modules_dir": modules_dir.relative_to(root).as_posix(),
            "modules": len(idx.files),
            "drivers": drivers,
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if spec.group == "trixie-backports":
            meta["note"] = f"label {spec.label!r} resolved to {rel} from trixie-backports"
        shutil.rmtree(debs_dir)
        (root / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        root.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress.say(f"kernel {spec.label} ({rel}) cached in {dest} after {time.monotonic() - t0:.1f} s")
    k = _from_json(dest)
    assert k is not None
    return k


# --------------------------------------------------------------------------------------------------
# Custom kernels and resolution


def bzimage_release(path: Path) -> str | None:
    """The ``uname -r`` a bzImage will report, from its setup header's kernel_version string."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x8000)
    except OSError:
        return None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    ptr, = struct.unpack_from("<H", head, 0x20E)
    off = ptr + 0x200
    if not ptr or off >= len(head):
        return None
    s = head[off: head.find(b"\0", off)].decode(errors="replace")
    return s.split()[0] if s else None


def _modules_release_dir(d: Path, release: str | None) -> Path:
    """Accept ``.../lib/modules/<rel>``, an install root containing it, or a dir with just one release."""
    if (d / "modules.builtin").exists() or (d / "modules.dep").exists() or (d / "kernel").is_dir():
        return d
    for base in (d / "lib" / "modules", d / "usr" / "lib" / "modules", d):
        if release and (base / release).is_dir():
            return base / release
        subs = [s for s in base.glob("*") if s.is_dir() and (s / "modules.builtin").exists()] \
            if base.is_dir() else []
        if len(subs) == 1:
            return subs[0]
    raise NotFound(f"{d} is not a modules tree: expected modules.builtin/modules.dep and kernel/ in it, "
                   "or lib/modules/<release>/ below it (as `make modules_install INSTALL_MOD_PATH=DIR` leaves)")


def custom(kernel: str | Path, modules: str | Path | None = None) -> Kernel:
    """A developer's own bzImage and (optionally) modules tree."""
    kpath = Path(kernel).expanduser()
    if not kpath.is_file():
        raise NotFound(f"kernel image {kpath} does not exist")
    release = bzimage_release(kpath)
    mdir = None
    if modules is not None:
        mpath = Path(modules).expanduser()
        if not mpath.is_dir():
            raise NotFound(f"modules directory {mpath} does not exist")
        mdir = _modules_release_dir(mpath, release)
        if release is None:
            release = mdir.name
    if release is None:
        release = "unknown"
    return Kernel(label="custom", release=release, vmlinuz=kpath.resolve(),
                  modules_dir=mdir.resolve() if mdir else None, flavour="custom")


def _looks_like_path(s: str) -> bool:
    return "/" in s or s.startswith((".", "~")) or Path(s).is_file()


def resolve(kernel: str | None, modules: str | None = None, *, fetch_missing: bool = True) -> Kernel:
    """Turn ``--kernel`` / ``--modules`` into a Kernel: a path means the user's own build, else a label."""
    if kernel is not None and _looks_like_path(str(kernel)):
        return custom(kernel, modules)
    if modules is not None:
        raise HvlabError("--modules goes with --kernel PATH (a kernel label brings its own modules)")
    label = kernel or DEFAULT_LABEL
    k = cached(label)
    if k is not None:
        return k
    if not fetch_missing:
        raise NotFound(f"kernel {label!r} is not in the cache; run `hvlab kernel fetch {label}`")
    return fetch(label)


def require_drivers(k: Kernel, names: tuple[str, ...] | list[str] = REQUIRED_DRIVERS) -> None:
    """Raise NotFound naming each driver that is neither built in nor a module of ``k``."""
    if k.modules_dir is None:
        raise NotFound(
            f"kernel {k.vmlinuz} has no modules tree, so hvlab cannot tell whether {', '.join(names)} "
            "are built in: pass --modules DIR (with modules.builtin), e.g. the INSTALL_MOD_PATH of "
            "`make modules_install`")
    status = k.driver_status(tuple(names))
    missing = [n for n, s in status.items() if s is None]
    if missing:
        raise NotFound(
            f"kernel {k.label} ({k.release}) lacks {', '.join(missing)}: neither built in "
            f"(modules.builtin) nor a module under {k.modules_dir}; hvlab needs CONFIG_HYPERV, "
            "CONFIG_HYPERV_NET and CONFIG_PCI_HYPERV (=y or =m)")

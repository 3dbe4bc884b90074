"""A private apt state for downloading Debian packages without touching the host's apt configuration.

hvlab needs a handful of Debian binary packages (cloud kernels from bookworm, trixie and
trixie-backports; busybox-static) on a host that may run any Debian release with any sources.  Adding
suites to the host's sources, or running ``apt-get update`` on them, would change what the host itself
installs.  So hvlab keeps its own sources list, lists and archive cache under ``<cache>/apt/`` and runs
``apt-get`` with ``-o Dir::...`` options pointing there.  Only the mirror host name is borrowed from
the host's sources (it is the one known to be reachable), and only Debian's archive keyring is trusted
(``signed-by``).

The Packages indices are read here in Python (not through ``apt-cache``) so that package selection is a
pure function of the index text, testable on made-up data.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import lzma
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from hvlab import paths, progress
from hvlab.errors import HvlabError, NotFound

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY = "http://deb.debian.org/debian-security"

#: Suites hvlab knows, grouped by the distribution family a kernel label selects from.
SUITE_GROUPS: dict[str, tuple[str, ...]] = {
    "bookworm": ("bookworm", "bookworm-updates", "bookworm-security"),
    "trixie": ("trixie", "trixie-updates", "trixie-security"),
    "trixie-backports": ("trixie-backports",),
}

#: Lists older than this are refreshed before selecting packages (kernels are updated every few weeks).
MAX_LIST_AGE = 12 * 3600

# Only these stanzas are kept when reading the indices: they are all hvlab ever asks for, and the full
# indices hold ~60,000 packages each.
_KEEP_PREFIXES = ("Package: linux-", "Package: busybox")


@dataclass(frozen=True)
class Package:
    """One stanza of a Packages index (the fields hvlab uses)."""

    name: str
    version: str
    suite: str
    depends: str = ""
    filename: str = ""
    sha256: str = ""
    size: int = 0
    source: str = ""

    def depends_names(self) -> list[str]:
        """Names in Depends, taking the first of each ``a | b`` alternative and dropping version constraints."""
        names = []
        for clause in self.depends.split(","):
            first = clause.split("|")[0].strip()
            if first:
                names.append(first.split()[0].split(":")[0])
        return names


# --------------------------------------------------------------------------------------------------
# Debian version comparison (dpkg's algorithm), needed to pick the newest kernel without calling dpkg.


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def _split_version(v: str) -> tuple[int, str, str]:
    epoch = 0
    if ":" in v:
        e, v = v.split(":", 1)
        epoch = int(e)
    upstream, _, revision = v.rpartition("-") if "-" in v else (v, "", "")
    return epoch, upstream, revision


def compare_versions(a: str, b: str) -> int:
    """<0, 0 or >0 as Debian version ``a`` sorts before, equal to or after ``b`` (as ``dpkg --compare-versions``)."""
    ea, ua, ra = _split_version(a)
    eb, ub, rb = _split_version(b)
    if ea != eb:
        return ea - eb
    return _compare_part(ua, ub) or _compare_part(ra, rb)


class VersionKey:
    """A sort key for Debian versions: ``max(pkgs, key=lambda p: VersionKey(p.version))``."""

    __slots__ = ("v",)

    def __init__(self, v: str) -> None:
        self.v = v

    def __lt__(self, other: VersionKey) -> bool:
        return compare_versions(self.v, other.v) < 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VersionKey) and compare_versions(self.v, other.v) == 0


# --------------------------------------------------------------------------------------------------
# Packages index parsing


def parse_packages(text: str, suite: str, keep: tuple[str, ...] | None = _KEEP_PREFIXES) -> Iterator[Package]:
    """Yield the stanzas of a Packages index (only those starting with a ``keep`` prefix, if given)."""
    for stanza in text.split("\n\n"):
        stanza = stanza.strip("\n")
        if not stanza or (keep is not None and not stanza.startswith(keep)):
            continue
        fields: dict[str, str] = {}
        key = None
        for line in stanza.split("\n"):
            if line[:1] in (" ", "\t"):
                if key is not None:
                    fields[key] += "\n" + line
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        if "Package" not in fields or "Version" not in fields:
            continue
        yield Package(
            name=fields["Package"], version=fields["Version"], suite=suite,
            depends=fields.get("Depends", ""), filename=fields.get("Filename", ""),
            sha256=fields.get("SHA256", ""), size=int(fields.get("Size", "0") or 0),
            source=fields.get("Source", ""),
        )


_LIST_RE = re.compile(r"_dists_(?P<suite>[^_]+)_(?P<component>[^_]+)_binary-(?P<arch>[^_]+)_Packages")


def suite_of_list(filename: str) -> str | None:
    """The suite a lists-dir file belongs to, from apt's file naming (``..._dists_SUITE_main_binary-amd64_Packages``)."""
    m = _LIST_RE.search(filename)
    return m.group("suite") if m else None


def read_index_file(path: Path) -> str:
    """Text of a Packages index in any compression apt may have stored it in (the host's apt.conf decides)."""
    name = path.name
    if name.endswith("_Packages"):
        return path.read_text(errors="replace")
    if name.endswith(".gz"):
        return gzip.decompress(path.read_bytes()).decode(errors="replace")
    if name.endswith(".xz"):
        return lzma.decompress(path.read_bytes()).decode(errors="replace")
    # lz4, zst, bz2, lzma: apt's own helper reads whatever apt wrote.
    out = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", str(path)], capture_output=True, check=True)
    return out.stdout.decode(errors="replace")


# --------------------------------------------------------------------------------------------------
# Host mirror discovery


def _host_source_uris(etc: Path = Path("/etc/apt")) -> list[str]:
    uris: list[str] = []
    files = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list")),
             *sorted((etc / "sources.list.d").glob("*.sources"))]
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("#"):
                continue
            if f.suffix == ".sources":
                if line.lower().startswith("uris:"):
                    uris.extend(line.split(":", 1)[1].split())
            elif line.startswith("deb"):
                parts = re.sub(r"\[[^\]]*\]", " ", line).split()
                if len(parts) >= 2:
                    uris.append(parts[1])
    return uris


def host_mirrors(etc: Path = Path("/etc/apt")) -> tuple[str, str]:
    """(archive URL, security URL), reusing the Debian mirror the host's own sources name.

    The host's mirror is known to be reachable from here (proxies and firewalls allow it), whereas an
    arbitrary mirror may not be.  Falls back to deb.debian.org.
    """
    archive = security = None
    for uri in _host_source_uris(etc):
        u = uri.rstrip("/")
        path = urlsplit(u).path
        if path.endswith("/debian-security") and security is None:
            security = u
        elif path.endswith("/debian") and archive is None:
            archive = u
    if archive is None:
        archive = DEFAULT_MIRROR
    if security is None:
        parts = urlsplit(archive)
        security = f"{parts.scheme}://{parts.netloc}/debian-security"
    return archive, security


# --------------------------------------------------------------------------------------------------
# The private apt state


class PrivateApt:
    """apt-get with its own sources, lists and cache under ``root`` (default ``<cache>/apt``)."""

    def __init__(self, root: Path | None = None, *, mirrors: tuple[str, str] | None = None) -> None:
        self.root = root if root is not None else paths.cache_subdir("apt")
        self.mirrors = mirrors or host_mirrors()
        self.sources = self.root / "sources.list"
        self.lists = self.root / "lists"
        self.cache = self.root / "cache"
        self.status = self.root / "status"
        self.stamp = self.root / "lists.stamp"
        self._records: list[Package] | None = None

    def sources_text(self) -> str:
        archive, security = self.mirrors
        lines = []
        for group in SUITE_GROUPS.values():
            for suite in group:
                base = security if suite.endswith("-security") else archive
                lines.append(f"deb [arch=amd64 signed-by={KEYRING}] {base} {suite} main")
        return "\n".join(lines) + "\n"

    def options(self) -> list[str]:
        """The ``-o`` options that make apt-get use only this private state."""
        opts = {
            "Dir::Etc::SourceList": str(self.sources),
            "Dir::Etc::SourceParts": "/dev/null",
            "Dir::Etc::Preferences": "/dev/null",
            "Dir::Etc::PreferencesParts": "/dev/null",
            "Dir::State::Lists": str(self.lists),
            "Dir::State::status": str(self.status),
            "Dir::Cache": str(self.cache),
            "Acquire::Languages": "none",
            "APT::Architecture": "amd64",
            "APT::Architectures": "amd64",
            # The private dirs belong to whoever runs hvlab; apt's _apt sandbox user could not write them.
            "APT::Sandbox::User": "root" if _is_root() else "",
        }
        out = []
        for k, v in opts.items():
            if v == "" and k == "APT::Sandbox::User":
                continue
            out += ["-o", f"{k}={v}"]
        return out

    def _prepare(self) -> None:
        for d in (self.lists / "partial", self.cache / "archives" / "partial"):
            d.mkdir(parents=True, exist_ok=True)
        self.status.touch()
        text = self.sources_text()
        if not self.sources.exists() or self.sources.read_text() != text:
            self.sources.write_text(text)
            self.stamp.unlink(missing_ok=True)

    def _run(self, args: list[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        if shutil.which("apt-get") is None:
            raise HvlabError("apt-get is needed to download Debian packages (hvlab runs on Debian-like hosts)")
        cmd = ["apt-get", "-q", *self.options(), *args]
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
            raise HvlabError(f"apt-get {' '.join(args)} failed:\n{tail}")
        return proc

    def lists_fresh(self) -> bool:
        return self.stamp.exists() and time.time() - self.stamp.stat().st_mtime < MAX_LIST_AGE

    def update(self, *, force: bool = False) -> bool:
        """Refresh the private package lists if they are missing, stale, or ``force``; True if it did."""
        self._prepare()
        if not force and self.lists_fresh():
            return False
        with progress.step(f"updating hvlab's private package lists from {self.mirrors[0]}"):
            self._run(["update"])
        self.stamp.touch()
        self._records = None
        return True

    def records(self) -> list[Package]:
        """All linux-* and busybox* stanzas of every suite's index (read once per instance)."""
        if self._records is None:
            recs: list[Package] = []
            for f in sorted(self.lists.glob("*_Packages*")):
                suite = suite_of_list(f.name)
                if suite is None or f.name.endswith((".diff_Index", "partial")):
                    continue
                recs.extend(parse_packages(read_index_file(f), suite))
            self._records = recs
        return self._records

    def download(self, pkgs: Iterable[Package], dest: Path) -> dict[str, Path]:
        """``apt-get download`` each package (exact version) into ``dest``; checks sizes and SHA256 against the index."""
        dest.mkdir(parents=True, exist_ok=True)
        pkgs = list(pkgs)
        self._run(["download", *[f"{p.name}={p.version}" for p in pkgs]], cwd=dest)
        got: dict[str, Path] = {}
        for p in pkgs:
            matches = sorted(dest.glob(f"{p.name}_*.deb"))
            if not matches:
                raise NotFound(f"apt-get download did not produce {p.name} {p.version}")
            deb = matches[-1]
            if p.sha256:
                digest = sha256_file(deb)
                if digest != p.sha256:
                    raise HvlabError(f"{deb.name}: SHA256 {digest} does not match the index ({p.sha256})")
            got[p.name] = deb
        return got


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created), so that concurrent hvlab processes (parallel test
    workers, the nested runner and the host) do not fetch into the same directories at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.say(f"waiting for another hvlab process to release {path}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_root() -> bool:
    import os

    return os.geteuid() == 0


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract_deb(deb: Path, dest: Path) -> None:
    """Unpack a .deb's data into ``dest`` (``dpkg-deb -x``: no maintainer scripts, no root needed)."""
    if shutil.which("dpkg-deb") is None:
        raise HvlabError("dpkg-deb is needed to unpack Debian packages")
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HvlabError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()}")

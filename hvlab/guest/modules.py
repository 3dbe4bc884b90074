"""Kernel module trees: which modules exist, which are built in, and what to load in which order.

A guest initramfs must carry exactly the modules the test needs plus their dependencies, loaded in
dependency order, and the guest has no depmod.  Debian's kernel packages ship modules.builtin and
modules.order but not modules.dep or modules.alias (their postinst runs depmod), and a developer's own
tree may lack them too, so when modules.dep is missing the index is built here from each module's
``.modinfo`` section (``depends=`` and ``alias=``), which is what depmod itself reads.

Module names are compared with dashes and underscores equivalent, as the kernel does (``pci-hyperv`` is
``pci_hyperv``).
"""

from __future__ import annotations

import fnmatch
import gzip
import lzma
import os
import shutil
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hvlab.errors import HvlabError, NotFound

COMPRESSION_SUFFIXES = (".xz", ".zst", ".gz")


def normalize(name: str) -> str:
    """Canonical module name: basename without .ko[.xz|.zst|.gz], dashes as underscores."""
    base = name.rsplit("/", 1)[-1]
    for suffix in COMPRESSION_SUFFIXES:
        if base.endswith(".ko" + suffix):
            base = base[: -len(suffix)]
            break
    if base.endswith(".ko"):
        base = base[:-3]
    return base.replace("-", "_")


def plain_relpath(relpath: str) -> str:
    """``kernel/x/y.ko.xz`` -> ``kernel/x/y.ko``: where a module goes once decompressed."""
    for suffix in COMPRESSION_SUFFIXES:
        if relpath.endswith(".ko" + suffix):
            return relpath[: -len(suffix)]
    return relpath


def decompress(data: bytes, filename: str) -> bytes:
    """The plain ELF of a module file, whatever its compression (named by its suffix)."""
    if filename.endswith(".xz"):
        return lzma.decompress(data)
    if filename.endswith(".gz"):
        return gzip.decompress(data)
    if filename.endswith(".zst"):
        try:
            import zstandard  # type: ignore[import-not-found]

            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        except ImportError:
            pass
        if shutil.which("zstd") is None:
            raise HvlabError(f"{filename} is zstd-compressed: install zstd (apt-get install zstd)")
        proc = subprocess.run(["zstd", "-dc"], input=data, capture_output=True)
        if proc.returncode != 0:
            raise HvlabError(f"zstd -d {filename} failed: {proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout
    return data


def read_module(path: Path) -> bytes:
    return decompress(path.read_bytes(), path.name)


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of a module's ``.modinfo`` section (ELF64 little-endian)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not an ELF64 little-endian object")
    e_shoff, = struct.unpack_from("<Q", elf, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        off = e_shoff + i * e_shentsize
        name, = struct.unpack_from("<I", elf, off)
        sh_offset, sh_size = struct.unpack_from("<QQ", elf, off + 0x18)
        return name, sh_offset, sh_size

    _, stroff, strsize = section(e_shstrndx)
    names = elf[stroff: stroff + strsize]
    out: dict[str, list[str]] = {}
    for i in range(e_shnum):
        name_off, off, size = section(i)
        end = names.find(b"\0", name_off)
        if names[name_off:end] != b".modinfo":
            continue
        for item in elf[off: off + size].split(b"\0"):
            if b"=" in item:
                k, _, v = item.decode(errors="replace").partition("=")
                out.setdefault(k, []).append(v)
        break
    return out


# --------------------------------------------------------------------------------------------------
# Index files


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep: ``relpath: dep-relpath ...`` (deps listed so that loading them last-to-first works)."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line or line.startswith("#"):
            continue
        mod, _, rest = line.partition(":")
        deps[mod.strip()] = rest.split()
    return deps


def parse_modules_builtin(text: str) -> set[str]:
    """modules.builtin: one ``kernel/.../name.ko`` per built-in module; returns canonical names."""
    return {normalize(line.strip()) for line in text.splitlines() if line.strip() and not line.startswith("#")}


def parse_modules_alias(text: str) -> list[tuple[str, str]]:
    """modules.alias: ``alias PATTERN module`` lines, as (pattern, canonical module name)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias":
            out.append((parts[1], normalize(parts[2])))
    return out


def format_modules_dep(deps: dict[str, list[str]]) -> str:
    return "".join(f"{mod}: {' '.join(d)}\n" if d else f"{mod}:\n" for mod, d in deps.items())


@dataclass(frozen=True)
class ModuleFile:
    """One loadable module of a tree."""

    name: str  # canonical (underscores)
    path: Path  # the file, possibly compressed
    relpath: str  # relative to the modules dir, as in modules.dep
    deps: tuple[str, ...] = ()  # canonical names of direct and indirect dependencies (modules.dep order)

    @property
    def plain_relpath(self) -> str:
        return plain_relpath(self.relpath)

    def read(self) -> bytes:
        """The decompressed module (what insmod needs: busybox's insmod cannot decompress)."""
        return read_module(self.path)


@dataclass
class ModuleIndex:
    """What a modules dir (``.../lib/modules/<release>``) provides."""

    modules_dir: Path
    files: dict[str, ModuleFile] = field(default_factory=dict)  # canonical name -> file
    builtin: set[str] = field(default_factory=set)
    aliases: list[tuple[str, str]] = field(default_factory=list)
    generated: bool = False  # modules.dep was built from .modinfo, not read

    @classmethod
    def load(cls, modules_dir: Path) -> ModuleIndex:
        """Read (or, without modules.dep, build) the index; memoised per process while the files are unchanged.

        Building from .modinfo decompresses every module (seconds for a distribution kernel), and one
        command may ask several times (driver check, then initramfs).
        """
        modules_dir = Path(modules_dir)
        if not modules_dir.is_dir():
            raise NotFound(f"modules directory {modules_dir} does not exist")
        key = (str(modules_dir.resolve()), *(_mtime(modules_dir / n) for n in (
            ".", "modules.dep", "modules.builtin", "modules.alias")))
        idx = _INDEX_CACHE.get(key)
        if idx is None:
            idx = _INDEX_CACHE[key] = cls._load(modules_dir)
        return idx

    @classmethod
    def _load(cls, modules_dir: Path) -> ModuleIndex:
        idx = cls(modules_dir)
        builtin = modules_dir / "modules.builtin"
        if builtin.exists():
            idx.builtin = parse_modules_builtin(builtin.read_text())
        dep_file = modules_dir / "modules.dep"
        if dep_file.exists() and dep_file.stat().st_size > 0:
            deps = parse_modules_dep(dep_file.read_text())
            alias_file = modules_dir / "modules.alias"
            if alias_file.exists():
                idx.aliases = parse_modules_alias(alias_file.read_text())
        else:
            deps, idx.aliases = scan_tree(modules_dir)
            idx.generated = True
        for rel, dl in deps.items():
            name = normalize(rel)
            idx.files[name] = ModuleFile(name, modules_dir / rel, rel, tuple(normalize(d) for d in dl))
        return idx

    def status(self, name: str) -> str | None:
        """"builtin", "module" or None (absent)."""
        n = normalize(name)
        if n in self.builtin:
            return "builtin"
        if n in self.files:
            return "module"
        return None

    def lookup_alias(self, alias: str) -> list[str]:
        """Modules whose alias patterns match ``alias`` (e.g. a PCI modalias)."""
        return [mod for pattern, mod in self.aliases if fnmatch.fnmatchcase(alias, pattern)]

    def closure(self, names: Iterable[str], *, optional: Iterable[str] = ()) -> list[ModuleFile]:
        """``names`` and everything they need, dependencies first; built-in ones skipped.

        A name that is neither a module nor built in raises NotFound; an ``optional`` one is skipped.
        """
        order: list[ModuleFile] = []
        seen: set[str] = set()
        missing: list[str] = []

        def visit(n: str, chain: tuple[str, ...]) -> None:
            if n in seen or n in self.builtin:
                return
            mf = self.files.get(n)
            if mf is None:
                missing.append(n if not chain else f"{n} (needed by {chain[-1]})")
                return
            seen.add(n)
            for d in reversed(mf.deps):  # modules.dep lists deps so that the last must load first
                if d not in chain:
                    visit(d, (*chain, n))
            order.append(mf)

        for n in names:
            visit(normalize(n), ())
        if missing:
            raise NotFound(f"module(s) not found in {self.modules_dir} (nor built in): {', '.join(missing)}")
        for n in optional:
            n = normalize(n)
            if n in self.files or n in self.builtin:
                visit(n, ())
        return order


_INDEX_CACHE: dict[tuple, ModuleIndex] = {}


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return 0


def scan_tree(modules_dir: Path) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """Build modules.dep and modules.alias content from every module's .modinfo (what depmod does).

    Returns ({relpath: [dep relpaths, modules.dep order]}, [(alias pattern, module)]).
    """
    rel_of: dict[str, str] = {}
    direct: dict[str, list[str]] = {}
    aliases: list[tuple[str, str]] = []
    for root, _dirs, names in os.walk(modules_dir):
        for fn in sorted(names):
            if not (fn.endswith(".ko") or any(fn.endswith(".ko" + s) for s in COMPRESSION_SUFFIXES)):
                continue
            p = Path(root) / fn
            rel = p.relative_to(modules_dir).as_posix()
            name = normalize(fn)
            if name in rel_of:  # prefer the first found (updates/ would override in depmod; rare here)
                continue
            try:
                info = modinfo(read_module(p))
            except (ValueError, struct.error, lzma.LZMAError, OSError, EOFError) as exc:
                raise HvlabError(f"cannot read module {p}: {exc}") from exc
            rel_of[name] = rel
            direct[name] = [normalize(d) for v in info.get("depends", []) for d in v.split(",") if d]
            aliases.extend((a, name) for a in info.get("alias", []))

    deps: dict[str, list[str]] = {}
    for name, rel in rel_of.items():
        order = _load_order(name, direct, set(rel_of))
        deps[rel] = [rel_of[d] for d in reversed(order)]  # modules.dep lists the reverse of load order
    return deps, aliases


def _load_order(name: str, direct: dict[str, list[str]], known: set[str]) -> list[str]:
    """Transitive dependencies of ``name`` (not itself), each after its own dependencies (post-order DFS)."""
    order: list[str] = []
    seen = {name}

    def visit(n: str) -> None:
        for d in direct.get(n, []):
            if d not in seen and d in known:
                seen.add(d)
                visit(d)
                order.append(d)

    visit(name)
    return order


def write_index(modules_dir: Path) -> ModuleIndex:
    """Generate modules.dep and modules.alias in ``modules_dir`` (a tree hvlab owns, e.g. a fetched kernel)."""
    deps, aliases = scan_tree(modules_dir)
    (modules_dir / "modules.dep").write_text(format_modules_dep(deps))
    (modules_dir / "modules.alias").write_text(
        "# Aliases extracted from modules themselves (by hvlab).\n"
        + "".join(f"alias {pat} {mod}\n" for pat, mod in aliases))
    return ModuleIndex.load(modules_dir)


def closure(modules_dir: Path, names: list[str], *, optional: Iterable[str] = ()) -> list[ModuleFile]:
    """Modules ``names`` with their dependencies in load order; built-in ones skipped."""
    return ModuleIndex.load(modules_dir).closure(names, optional=optional)

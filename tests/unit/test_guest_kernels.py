"""Kernel selection from package indices, labels, the cache, custom kernels and driver checks."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from hvlab.errors import HvlabError, NotFound
from hvlab.guest import apt, kernels
from hvlab.guest.testing import FAKE_MODULES, fake_kernel, fake_modules_tree


def stanza(name: str, version: str, depends: str = "", size: int = 1000) -> str:
    out = f"Package: {name}\nSource: linux-signed-amd64\nVersion: {version}\nArchitecture: amd64\n"
    if depends:
        out += f"Depends: {depends}\n"
    out += f"Filename: pool/main/l/{name}_{version}_amd64.deb\nSize: {size}\nSHA256: {'0' * 64}\n"
    out += "Description: Linux\n whatever continuation line\n"
    return out


def image(abi: str, flavour: str, version: str) -> str:
    return stanza(f"linux-image-{abi}-{flavour}", version, "kmod, initramfs-tools (>= 0.120+deb8u2) | "
                  "linux-initramfs-tool")


def split_image(abi: str, flavour: str, version: str) -> list[str]:
    """The 2026 trixie-backports layout: an empty image package depending on base, binary and modules."""
    n = f"{abi}-{flavour}"
    return [
        stanza(f"linux-image-{n}", version, f"dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, "
               f"linux-base-{n} (= {version}), linux-binary-{n} (= {version}), linux-modules-{n} (= {version})"),
        stanza(f"linux-base-{n}", version),
        stanza(f"linux-binary-{n}", version, f"linux-base-{n} (= {version})"),
        stanza(f"linux-binary-unsigned-{n}", version, f"linux-base-{n} (= {version})"),
        stanza(f"linux-modules-{n}", version, f"kmod, linux-base-{n} (= {version})"),
    ]


INDEX = {
    "bookworm": [image("6.1.0-50", "cloud-amd64", "6.1.176-1"), image("6.1.0-50", "amd64", "6.1.176-1"),
                 stanza("linux-image-cloud-amd64", "6.1.176-1", "linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)"),
                 stanza("linux-image-6.1.0-50-cloud-amd64-unsigned", "6.1.176-1"),
                 stanza("busybox-static", "1:1.35.0-4+b3"), stanza("nginx", "1.0")],
    "bookworm-security": [image("6.1.0-55", "cloud-amd64", "6.1.190-1"), image("6.1.0-56", "cloud-amd64", "6.1.192-2"),
                          image("6.1.0-9", "cloud-amd64", "6.1.27-1"),
                          # the bookworm 6.12 LTS kernel must not be taken for "6.1"
                          image("6.12.43+deb12", "cloud-amd64", "6.12.43-1~deb12u1")],
    "bookworm-updates": [],
    "trixie": [image("6.12.117+deb13", "cloud-amd64", "6.12.117-1"), image("6.12.117+deb13", "amd64", "6.12.117-1"),
               image("6.12.117+deb13", "rt-amd64", "6.12.117-1"), stanza("busybox-static", "1:1.37.0-6+b3")],
    "trixie-security": [image("6.12.118+deb13", "cloud-amd64", "6.12.118-1"),
                        image("6.12.118+deb13", "amd64", "6.12.118-1"),
                        image("6.12.115+deb13.1", "cloud-amd64", "6.12.115-1+deb13.1")],
    "trixie-updates": [],
    "trixie-backports": [image("6.19.14+deb13", "cloud-amd64", "6.19.14-1~bpo13+1"),
                         *split_image("7.2.12+deb13", "cloud-amd64", "7.2.12-1~bpo13+1"),
                         *split_image("7.3.4+deb13", "cloud-amd64", "7.3.4-1~bpo13+1"),
                         *split_image("7.3.10+deb13", "amd64", "7.3.10-1~bpo13+1"),
                         image("7.3.3+deb13", "cloud-amd64", "7.3.3-1~bpo13+1")],
}


@pytest.fixture
def records() -> list[apt.Package]:
    return [p for suite, st in INDEX.items() for p in apt.parse_packages("\n".join(st), suite)]


def names(sel: kernels.Selection) -> list[str]:
    return [p.name for p in sel.packages]


def test_version_comparison() -> None:
    cmp = apt.compare_versions
    assert cmp("6.1.192-2", "6.1.176-1") > 0
    assert cmp("7.3.4-1~bpo13+1", "7.3.4-1") < 0
    assert cmp("6.12.115-1+deb13.1", "6.12.115-1") > 0
    assert cmp("1:1.0", "2.0") > 0
    assert cmp("1.0~rc1", "1.0") < 0
    assert cmp("6.1.27-1", "6.1.192-1") < 0
    assert cmp("1.0-1", "1.0-1") == 0
    assert max(["6.12.9-1", "6.12.117-1", "6.12.11-1"], key=apt.VersionKey) == "6.12.117-1"


def test_parse_packages_keeps_only_wanted(records) -> None:
    assert not any(r.name == "nginx" for r in records)
    r = next(r for r in records if r.name == "linux-image-6.1.0-56-cloud-amd64")
    assert (r.suite, r.version, r.size) == ("bookworm-security", "6.1.192-2", 1000)
    assert r.depends_names() == ["kmod", "initramfs-tools"]


def test_select_6_1_newest_across_bookworm_suites(records) -> None:
    sel = kernels.select_packages(records, kernels.parse_label("6.1"))
    assert sel.release == "6.1.0-56-cloud-amd64"
    assert sel.version == "6.1.192-2"
    assert names(sel) == ["linux-image-6.1.0-56-cloud-amd64"]


def test_select_6_12_cloud_and_generic(records) -> None:
    sel = kernels.select_packages(records, kernels.parse_label("6.12"))
    assert sel.release == "6.12.118+deb13-cloud-amd64"
    assert sel.image.suite == "trixie-security"
    l1 = kernels.select_packages(records, kernels.parse_label("l1-6.12"))
    assert l1.release == "6.12.118+deb13-amd64"  # generic flavour, not cloud-amd64 or rt-amd64
    assert names(l1) == ["linux-image-6.12.118+deb13-amd64"]


def test_select_7_3_split_packages(records) -> None:
    sel = kernels.select_packages(records, kernels.parse_label("7.3"))
    assert sel.release == "7.3.4+deb13-cloud-amd64"
    assert sel.version == "7.3.4-1~bpo13+1"
    assert sorted(names(sel)) == sorted([
        "linux-image-7.3.4+deb13-cloud-amd64", "linux-base-7.3.4+deb13-cloud-amd64",
        "linux-binary-7.3.4+deb13-cloud-amd64", "linux-modules-7.3.4+deb13-cloud-amd64"])
    assert names(sel)[0] == "linux-image-7.3.4+deb13-cloud-amd64"


def test_select_series_and_exact_release(records) -> None:
    assert kernels.select_packages(records, kernels.parse_label("7")).release == "7.3.4+deb13-cloud-amd64"
    assert kernels.select_packages(records, kernels.parse_label("7.2")).release == "7.2.12+deb13-cloud-amd64"
    exact = kernels.parse_label("7.3.3+deb13-cloud-amd64")
    assert exact.abi == "7.3.3+deb13" and exact.group == "trixie-backports"
    assert kernels.select_packages(records, exact).version == "7.3.3-1~bpo13+1"
    assert kernels.parse_label("6.12.118+deb13-amd64").flavour == "amd64"


def test_select_missing_series_names_what_exists(records) -> None:
    with pytest.raises(NotFound, match=r"7\.3\.4\+deb13"):
        kernels.select_packages(records, kernels.parse_label("7.9"))


def test_select_missing_split_part(records) -> None:
    broken = [r for r in records if r.name != "linux-modules-7.3.4+deb13-cloud-amd64"]
    with pytest.raises(NotFound, match="linux-modules-7.3.4"):
        kernels.select_packages(broken, kernels.parse_label("7.3"))


@pytest.mark.parametrize("bad", ["6", "foo", "6.12-rc1", "l1-", ""])
def test_bad_labels(bad: str) -> None:
    with pytest.raises(HvlabError):
        kernels.parse_label(bad)


def test_label_groups() -> None:
    assert kernels.parse_label("6.1").group == "bookworm"
    assert kernels.parse_label("6.12").group == "trixie"
    assert kernels.parse_label("7.3").group == "trixie-backports"
    assert kernels.parse_label("l1-6.12").flavour == "amd64"


def test_suite_of_list_and_index_reading(tmp_path) -> None:
    assert apt.suite_of_list("deb.debian.org_debian_dists_trixie-backports_main_binary-amd64_Packages.lz4") == \
        "trixie-backports"
    assert apt.suite_of_list("deb.debian.org_debian_dists_trixie_InRelease") is None
    import gzip
    p = tmp_path / "x_dists_trixie_main_binary-amd64_Packages.gz"
    p.write_bytes(gzip.compress(b"Package: linux-image-amd64\nVersion: 1\n"))
    assert "linux-image-amd64" in apt.read_index_file(p)


def test_host_mirrors(tmp_path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# http://snapshot.debian.org/archive/debian/2025\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm\n\nTypes: deb\nURIs: http://mirror.example/debian-security/\nSuites: bookworm-security\n")
    (tmp_path / "sources.list.d" / "other.list").write_text("deb https://packages.example.com/apt x main\n")
    assert apt.host_mirrors(tmp_path) == ("http://mirror.example/debian", "http://mirror.example/debian-security")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert apt.host_mirrors(empty) == (apt.DEFAULT_MIRROR, apt.DEFAULT_SECURITY)


def test_private_apt_never_uses_host_config(tmp_path) -> None:
    pa = apt.PrivateApt(tmp_path, mirrors=("http://m/debian", "http://m/debian-security"))
    opts = " ".join(pa.options())
    for key in ("Dir::Etc::SourceList=" + str(tmp_path), "Dir::Etc::SourceParts=/dev/null",
                "Dir::State::Lists=" + str(tmp_path), "Dir::Cache=" + str(tmp_path),
                "Dir::State::status=" + str(tmp_path)):
        assert key in opts
    text = pa.sources_text()
    assert "signed-by=/usr/share/keyrings/debian-archive-keyring.gpg" in text
    assert "http://m/debian-security trixie-security main" in text
    assert "http://m/debian trixie-backports main" in text


# --------------------------------------------------------------------------------------------------
# drivers, custom kernels, the cache


def test_require_drivers(tmp_path) -> None:
    kernels.require_drivers(fake_kernel(tmp_path / "a"))
    k = fake_kernel(tmp_path / "b", builtin=("hv_vmbus", "pci-hyperv", "pci-hyperv-intf"))
    kernels.require_drivers(k)
    assert k.driver_status() == {"hv_vmbus": "builtin", "hv_netvsc": "module", "pci_hyperv": "builtin"}
    mods = tuple(m for m in FAKE_MODULES if m[0] not in ("hv_netvsc", "pci-hyperv"))
    k = fake_kernel(tmp_path / "c", modules=mods)
    with pytest.raises(NotFound, match="lacks hv_netvsc, pci_hyperv"):
        kernels.require_drivers(k)
    k.modules_dir = None
    with pytest.raises(NotFound, match="--modules"):
        kernels.require_drivers(k)


def fake_bzimage(path: Path, version: str) -> None:
    blob = bytearray(0x1000)
    blob[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", blob, 0x206, 0x020F)
    struct.pack_into("<H", blob, 0x20E, 0x800 - 0x200)
    s = f"{version} (someone@example) #1 SMP".encode()
    blob[0x800: 0x800 + len(s)] = s
    path.write_bytes(bytes(blob))


def test_custom_kernel(tmp_path) -> None:
    bz = tmp_path / "bzImage"
    fake_bzimage(bz, "7.4.0-rc1-dev+")
    assert kernels.bzimage_release(bz) == "7.4.0-rc1-dev+"
    fake_modules_tree(tmp_path / "mods", "7.4.0-rc1-dev+")
    k = kernels.resolve(str(bz), str(tmp_path / "mods"))  # INSTALL_MOD_PATH style root
    assert (k.label, k.flavour, k.release) == ("custom", "custom", "7.4.0-rc1-dev+")
    assert k.modules_dir == (tmp_path / "mods/lib/modules/7.4.0-rc1-dev+").resolve()
    k2 = kernels.resolve(str(bz), str(tmp_path / "mods/lib/modules/7.4.0-rc1-dev+"))
    assert k2.modules_dir == k.modules_dir
    kernels.require_drivers(k)


def test_custom_kernel_bad_paths(tmp_path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        kernels.resolve(str(tmp_path / "no-bzImage"))
    bz = tmp_path / "bzImage"
    fake_bzimage(bz, "7.4.0")
    with pytest.raises(NotFound, match="does not exist"):
        kernels.resolve(str(bz), str(tmp_path / "no-mods"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFound, match="not a modules tree"):
        kernels.resolve(str(bz), str(tmp_path / "empty"))
    with pytest.raises(HvlabError, match="--modules goes with"):
        kernels.resolve("6.12", str(tmp_path))


def test_resolve_without_fetch(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HVLAB_CACHE", str(tmp_path))
    with pytest.raises(NotFound, match="hvlab kernel fetch 6.12"):
        kernels.resolve(None, fetch_missing=False)
    assert kernels.list_cached() == []


class FakeApt:
    """Stands in for PrivateApt: serves INDEX records and builds the .debs with dpkg-deb."""

    mirrors = ("http://m/debian", "http://m/debian-security")

    def __init__(self, tmp: Path, records: list[apt.Package]) -> None:
        self.tmp, self._records, self.downloads = tmp, records, 0

    def update(self, force: bool = False) -> bool:
        return False

    def lists_fresh(self) -> bool:
        return True

    def records(self) -> list[apt.Package]:
        return self._records

    def download(self, pkgs, dest: Path) -> dict[str, Path]:
        self.downloads += 1
        dest.mkdir(parents=True, exist_ok=True)
        out = {}
        for p in pkgs:
            tree = self.tmp / "build" / p.name
            release = p.name.split("-", 2)[2]  # linux-<part>-<release>
            if p.name.startswith("linux-base-"):
                fake_modules_tree(tree / "usr", release, modules=())
            elif p.name.startswith("linux-modules-"):
                fake_modules_tree(tree / "usr", release, builtin=())
                (tree / "usr/lib/modules" / release / "modules.builtin").unlink()
            elif p.name.startswith("linux-binary-"):
                (tree / "usr/lib/modules" / release).mkdir(parents=True, exist_ok=True)
                (tree / "usr/lib/modules" / release / "vmlinuz").write_bytes(b"kernel")
            (tree / "DEBIAN").mkdir(parents=True, exist_ok=True)
            (tree / "DEBIAN/control").write_text(
                f"Package: {p.name}\nVersion: {p.version}\nArchitecture: amd64\nMaintainer: x <x@x>\n"
                "Description: fake\n")
            deb = dest / f"{p.name}_{p.version}_amd64.deb"
            subprocess.run(["dpkg-deb", "-Zgzip", "--build", str(tree), str(deb)], check=True,
                           capture_output=True)
            out[p.name] = deb
        return out


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_fetch_split_layout_with_fake_apt(tmp_path, monkeypatch, records) -> None:
    monkeypatch.setenv("HVLAB_CACHE", str(tmp_path / "cache"))
    fa = FakeApt(tmp_path, records)
    k = kernels.fetch("7.3", pkg_apt=fa)  # type: ignore[arg-type]
    assert k.release == "7.3.4+deb13-cloud-amd64"
    assert k.vmlinuz.read_bytes() == b"kernel"
    assert k.modules_dir is not None and (k.modules_dir / "modules.dep").exists()
    meta = json.loads((tmp_path / "cache/kernels/7.3/kernel.json").read_text())
    assert [p["name"] for p in meta["packages"]][0] == "linux-image-7.3.4+deb13-cloud-amd64"
    assert len(meta["packages"]) == 4 and all(len(p["sha256"]) == 64 for p in meta["packages"])
    assert meta["drivers"]["hv_netvsc"] == "module"
    assert "trixie-backports" in meta["note"]
    # cached: instant, no second download; found by label and by release
    assert kernels.fetch("7.3", pkg_apt=fa).release == k.release  # type: ignore[arg-type]
    assert fa.downloads == 1
    assert kernels.fetch("7.3", refresh=True, pkg_apt=fa).release == k.release  # type: ignore[arg-type]
    assert fa.downloads == 1  # still the newest: nothing downloaded
    assert kernels.resolve("7.3.4+deb13-cloud-amd64", fetch_missing=False).label == "7.3"
    assert [c.label for c in kernels.list_cached()] == ["7.3"]
    assert not list((tmp_path / "cache/kernels").glob(".tmp-*"))

"""Module trees: index parsing, .modinfo-based modules.dep generation, closure order, decompression."""

from __future__ import annotations

import shutil

import pytest

from hvlab.errors import NotFound
from hvlab.guest import modules as M
from hvlab.guest.testing import fake_modules_tree, make_ko

SUFFIXES = (".xz", ".gz", ".zst") if shutil.which("zstd") else (".xz", ".gz")


def test_normalize_and_plain_relpath() -> None:
    assert M.normalize("pci-hyperv") == "pci_hyperv"
    assert M.normalize("kernel/drivers/pci/controller/pci-hyperv.ko.xz") == "pci_hyperv"
    assert M.normalize("hv_vmbus.ko.zst") == "hv_vmbus"
    assert M.plain_relpath("kernel/a/b.ko.zst") == "kernel/a/b.ko"
    assert M.plain_relpath("kernel/a/b.ko") == "kernel/a/b.ko"


def test_modinfo_of_fake_module() -> None:
    info = M.modinfo(make_ko("pci-hyperv", ("pci_hyperv_intf", "hv_vmbus"), ("vmbus:abc",)))
    assert info["depends"] == ["pci_hyperv_intf,hv_vmbus"]
    assert info["alias"] == ["vmbus:abc"]
    with pytest.raises(ValueError):
        M.modinfo(b"not elf at all, definitely not")


def test_parsers() -> None:
    dep = M.parse_modules_dep("kernel/a.ko.xz: kernel/b.ko.xz kernel/c.ko.xz\nkernel/c.ko.xz:\n")
    assert dep == {"kernel/a.ko.xz": ["kernel/b.ko.xz", "kernel/c.ko.xz"], "kernel/c.ko.xz": []}
    assert M.parse_modules_builtin("kernel/drivers/hv/hv_vmbus.ko\nkernel/x/pci-hyperv.ko\n") == {
        "hv_vmbus", "pci_hyperv"}
    assert M.parse_modules_alias("# c\nalias vmbus:abc hv_netvsc\nalias pci:v* pci-stub\n") == [
        ("vmbus:abc", "hv_netvsc"), ("pci:v*", "pci_stub")]


@pytest.mark.parametrize("with_dep", [False, True], ids=["generated", "modules.dep"])
def test_closure_load_order(tmp_path, with_dep: bool) -> None:
    mdir = fake_modules_tree(tmp_path, suffixes=SUFFIXES, with_dep=with_dep)
    idx = M.ModuleIndex.load(mdir)
    assert idx.generated is not with_dep
    names = [m.name for m in idx.closure(["hv_netvsc", "pci-hyperv", "mlx5_core"])]
    assert names == ["hv_vmbus", "hv_netvsc", "pci_hyperv_intf", "pci_hyperv", "mlxfw", "mlx5_core"]
    # each module after all of its dependencies
    for i, name in enumerate(names):
        for dep in idx.files[name].deps:
            assert names.index(dep) < i


def test_closure_decompresses_every_format(tmp_path) -> None:
    mdir = fake_modules_tree(tmp_path, suffixes=SUFFIXES)
    mods = M.closure(mdir, ["hv_netvsc", "pci_hyperv", "hv_utils", "vmxnet3"])
    assert {m.path.suffix for m in mods} == set(SUFFIXES)
    for m in mods:
        data = m.read()
        assert data[:4] == b"\x7fELF"
        assert M.modinfo(data)["name"] == [m.name]
        assert m.plain_relpath.endswith(".ko")


def test_builtin_skipped_and_missing_named(tmp_path) -> None:
    mdir = fake_modules_tree(tmp_path, builtin=("hv_vmbus", "pci-hyperv-intf", "pci-hyperv"))
    idx = M.ModuleIndex.load(mdir)
    assert idx.status("pci-hyperv") == "builtin"
    assert idx.status("hv_netvsc") == "module"
    assert idx.status("nope") is None
    assert [m.name for m in idx.closure(["hv_netvsc", "pci_hyperv"])] == ["hv_netvsc"]
    with pytest.raises(NotFound, match="no_such_mod"):
        idx.closure(["hv_netvsc", "no-such-mod"])
    # optional modules are added when present and silently skipped when not
    assert [m.name for m in idx.closure(["hv_netvsc"], optional=["vmxnet3", "absent"])] == [
        "hv_netvsc", "vmxnet3"]


def test_write_index_and_alias(tmp_path) -> None:
    mdir = fake_modules_tree(tmp_path)
    idx = M.write_index(mdir)
    assert not idx.generated  # re-read from the files just written
    assert (mdir / "modules.dep").read_text().count("\n") == len(idx.files)
    assert idx.lookup_alias("fake:hv_netvsc-xyz") == ["hv_netvsc"]


def test_missing_modules_dir(tmp_path) -> None:
    with pytest.raises(NotFound):
        M.ModuleIndex.load(tmp_path / "nope")

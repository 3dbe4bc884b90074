"""The QEMU runner's command line and guards, without starting QEMU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hvlab.errors import HvlabError
from hvlab.qemu.root import QemuRoot
from hvlab.qemu.runner import VF_BUS, QemuVfConfig, QemuVfGuest


def argv_for(tmp_path: Path, **cfg) -> tuple[QemuVfGuest, list[str]]:
    g = QemuVfGuest(QemuVfConfig(**cfg), QemuRoot(tmp_path / "root"))
    g.run_dir = tmp_path / "run"
    return g, g.build_argv(Path("/k/vmlinuz"), Path("/k/initrd"))


def value_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_cold_plug_command_line(tmp_path):
    g, argv = argv_for(tmp_path, memory_mb=384)
    assert argv[:4] == g.root.command()[:4]
    assert value_after(argv, "-accel") == ["tcg"]
    assert "memory-backend-memfd,id=mem,size=384M,share=on" in value_after(argv, "-object")
    assert value_after(argv, "-machine") == ["q35,memory-backend=mem"]
    devices = value_after(argv, "-device")
    assert devices[0] == f"pcie-root-port,id={VF_BUS},chassis=1,slot=1"
    vf = json.loads(devices[1])
    assert vf == {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(tmp_path / "run/vf.sock")},
                  "bus": VF_BUS, "id": "vf0"}
    chardevs = value_after(argv, "-chardev")
    assert chardevs[0] == f"file,id=con,path={tmp_path / 'run/console.log'}"
    assert chardevs[1].startswith("socket,id=agent,") and "server=on,wait=off" in chardevs[1]
    assert value_after(argv, "-serial") == ["chardev:con", "chardev:agent"]  # ttyS0 console, ttyS1 agent
    assert value_after(argv, "-append")[0].startswith("console=ttyS0")


def test_hotplug_boot_has_no_vf_device(tmp_path):
    _, argv = argv_for(tmp_path, cold_plug=False, msix=False)
    assert not any("vfio-user-pci" in a for a in argv)


def test_unplug_with_msix_is_refused(tmp_path):
    g = QemuVfGuest(QemuVfConfig(msix=True), QemuRoot(tmp_path / "root"))
    g.qmp = object()  # type: ignore[assignment]  # never used: the guard comes first
    with pytest.raises(HvlabError, match="MSI-X"):
        g.unplug()

"""Boot an hvlab guest under QEMU (TCG) with a VF NIC served by hvlab over vfio-user.

Pieces, all in this process except QEMU itself: the vmxnet3 model on a vfio-user server thread, plugged
into a switch port next to the responder (192.0.2.1); QEMU from the cached trixie root with the device as
``vfio-user-pci`` on a pcie-root-port of a q35 machine; ttyS0 written by QEMU to ``console.log`` in the run
directory; ttyS1 a Unix socket to the guest agent; a QMP socket for hot-plug. Guest RAM is a shared memfd
so that the vfio-user server maps it (DMA without round trips).

KVM here cannot run stock kernels; TCG is plenty for interop. One QEMU at a time on this machine.
"""

from __future__ import annotations

import json
import logging
import shlex
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvlab import paths, progress
from hvlab.agent.host import Agent, RunResult
from hvlab.errors import GuestError, HvlabError
from hvlab.net.switch import mac_bytes, mac_str
from hvlab.net.topology import GUEST_MAC, default_topology, guest_ip_setup
from hvlab.qemu.qmp import Qmp
from hvlab.qemu.root import QemuRoot
from hvlab.vf.vmxnet3 import Vmxnet3
from hvlab.vfio_user.server import VfioUserServer

log = logging.getLogger("hvlab.qemu")

VF_ID = "vf0"
VF_BUS = "rp1"


@dataclass
class QemuVfConfig:
    """What to boot. ``msix=False`` offers MSI only (required to unplug under QEMU 11.1.3)."""

    kernel: str | None = "6.12"
    modules: str | None = None
    mac: str = GUEST_MAC
    msix: bool = True
    cold_plug: bool = True
    smp: int = 1
    memory_mb: int = 512
    max_revision: int = 3
    boot_timeout: float = 180.0
    append: str = ""
    extra_qemu: list[str] = field(default_factory=list)


class QemuVfGuest:
    """A running guest; use as a context manager so QEMU, the server and the switch always stop."""

    def __init__(self, config: QemuVfConfig, root: QemuRoot | None = None) -> None:
        self.config = config
        self.root = root or QemuRoot()
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: Qmp | None = None
        self.server: VfioUserServer | None = None
        self.meta: dict[str, Any] = {"accelerator": "tcg"}
        self._agent_sock: socket.socket | None = None
        self._closed = False

    # ------------------------------------------------------------------ start
    def start(self) -> QemuVfGuest:
        """Build what is missing, start the server, QEMU and the agent; everything is undone on failure."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        from hvlab.guest import initramfs, kernels

        cfg = self.config
        self.root.ensure()
        kernel = kernels.resolve(cfg.kernel, cfg.modules)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = paths.runs_dir() / f"{stamp}-qemu-{kernel.label}-{int(time.monotonic() * 1000) % 100000}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with progress.step(f"building the initramfs for {kernel.label} ({kernel.release})"):
            initrd = initramfs.build_guest_initramfs(kernel, extra_modules=["vmxnet3"])
        self.topology = default_topology(pcap_dir=self.run_dir)
        self.switch = self.topology.switch
        self.responder = self.topology.responder
        self.device = Vmxnet3(cfg.mac, msix=cfg.msix, max_revision=cfg.max_revision)
        self.port = self.switch.add_port("vf", self.device.deliver)
        self.port.set_pcap(self.run_dir / "vf.pcap")
        self.device.attach(self.port)
        self.vf_socket = str(self.run_dir / "vf.sock")
        self.server = VfioUserServer(self.device, self.vf_socket).start()
        argv = self.build_argv(kernel.vmlinuz, initrd)
        (self.run_dir / "qemu.argv").write_text(shlex.join(argv) + "\n")
        self.meta.update(kernel=kernel.label, release=kernel.release, qemu=self.root.version(),
                         mac=cfg.mac, msix=cfg.msix, cold_plug=cfg.cold_plug)
        self.t0 = time.monotonic()
        self._stderr = open(self.run_dir / "qemu.stderr", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
                                     env=self.root.env())
        self.qmp = Qmp(self.qmp_path, connect_for=30.0)
        self.agent = Agent(self._agent_send, alive=self.alive)
        self._connect_agent()
        with progress.step(f"booting {kernel.label} under QEMU TCG (console: {self.console_path})"):
            self.agent.wait_ready(cfg.boot_timeout)
        self.meta["agent_ready_s"] = round(time.monotonic() - self.t0, 1)

    def build_argv(self, vmlinuz: Path, initrd: Path) -> list[str]:
        """QEMU's command line for this run (paths under ``run_dir``)."""
        cfg = self.config
        self.vf_socket = str(self.run_dir / "vf.sock")
        self.qmp_path = str(self.run_dir / "qmp.sock")
        self.agent_path = str(self.run_dir / "agent.sock")
        self.console_path = self.run_dir / "console.log"
        cmdline = f"console=ttyS0 panic=-1 {cfg.append}".strip()
        argv = [
            *self.root.command(),
            "-machine", "q35,memory-backend=mem", "-accel", "tcg", "-cpu", "max",
            "-smp", str(cfg.smp), "-m", f"{cfg.memory_mb}M",
            # Shared memfd RAM: QEMU hands the fd to the vfio-user server, which maps guest memory.
            "-object", f"memory-backend-memfd,id=mem,size={cfg.memory_mb}M,share=on",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(vmlinuz), "-initrd", str(initrd), "-append", cmdline,
            "-chardev", f"file,id=con,path={self.console_path}", "-serial", "chardev:con",
            "-chardev", f"socket,id=agent,path={self.agent_path},server=on,wait=off", "-serial", "chardev:agent",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-device", f"pcie-root-port,id={VF_BUS},chassis=1,slot=1",
            *cfg.extra_qemu,
        ]
        if cfg.cold_plug:
            argv += ["-device", json.dumps(self.device_spec())]
        return argv

    def device_spec(self) -> dict[str, Any]:
        return {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": self.vf_socket},
                "bus": VF_BUS, "id": VF_ID}

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _connect_agent(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(self.agent_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline or not self.alive():
                    raise GuestError(f"QEMU did not open the agent socket; see {self.run_dir}/qemu.stderr") from None
                time.sleep(0.05)
        self._agent_sock = s
        threading.Thread(target=self._agent_reader, name="hvlab-qemu-agent", daemon=True).start()

    def _agent_reader(self) -> None:
        s = self._agent_sock
        assert s is not None
        while True:
            try:
                data = s.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.agent.on_output(data)

    def _agent_send(self, data: bytes) -> None:
        if self._agent_sock is None:
            raise GuestError("the guest agent is not connected")
        self._agent_sock.sendall(data)

    # ------------------------------------------------------------------ guest operations
    def run(self, command: str, timeout: float = 60.0) -> RunResult:
        return self.agent.run(command, timeout)

    def find_interface(self, timeout: float = 20.0) -> str:
        """The guest netdev carrying the VF's MAC (waits for the driver to probe)."""
        mac = mac_str(mac_bytes(self.config.mac))
        script = (f"n=0; while [ $n -lt {int(timeout * 5)} ]; do for d in /sys/class/net/*; do "
                  f"[ \"$(cat $d/address 2>/dev/null)\" = {mac} ] && {{ basename $d; exit 0; }}; done; "
                  "n=$((n+1)); sleep 0.2; done; exit 1")
        r = self.run(script, timeout + 10)
        if r.returncode != 0:
            dmesg = self.run("dmesg | grep -i -E 'vmxnet3|vfio|pci' | tail -20").stdout
            raise GuestError(f"no guest interface with MAC {mac} after {timeout:.0f} s; dmesg:\n{dmesg}")
        return r.stdout.strip()

    def setup_network(self) -> str:
        """Find the VF interface by MAC, give it 192.0.2.2/24 and bring it up; returns its name."""
        iface = self.find_interface()
        self.run(guest_ip_setup(iface), 30).check()
        self.iface = iface
        return iface

    def interface_present(self) -> bool:
        mac = mac_str(mac_bytes(self.config.mac))
        r = self.run(f"grep -l -x {mac} /sys/class/net/*/address")
        return r.returncode == 0

    # ------------------------------------------------------------------ hot-plug
    def plug(self) -> None:
        assert self.qmp is not None
        self.qmp.execute("device_add", self.device_spec())

    def unplug(self, timeout: float = 30.0, *, force: bool = False) -> None:
        """device_del and wait for QEMU's DEVICE_DELETED (the guest releases the device via pciehp).

        Refused for a device with MSI-X unless ``force``: QEMU 11.1.3 then aborts in
        memory_region_del_subregion (seen here: "Assertion `subregion->container == mr' failed")."""
        assert self.qmp is not None
        if self.config.msix and not force:
            raise HvlabError("QEMU 11.1.3 aborts on device_del of a vfio-user device with MSI-X; "
                             "boot with msix=False (hvlab qemu --hotplug / --msi-only) to unplug")
        self.qmp.execute("device_del", {"id": VF_ID})
        self.qmp.wait_event("DEVICE_DELETED", timeout, device=VF_ID)

    # ------------------------------------------------------------------ stop
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.proc is not None and self.proc.poll() is None:
            try:
                if self.qmp is not None:
                    self.qmp.execute("quit")
            except (HvlabError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.qmp is not None:
            self.qmp.close()
        if self._agent_sock is not None:
            self._agent_sock.close()
        if self.server is not None:
            self.server.stop()
            self.meta["device"] = dict(self.device.counters)
            self.meta["violations"] = list(self.device.violations)[-50:]
            self.meta["vf_port"] = self.port.counters.snapshot()
        if hasattr(self, "topology"):
            self.topology.close()
        if hasattr(self, "_stderr"):
            self._stderr.close()
        if hasattr(self, "run_dir"):
            self.meta["exit_code"] = self.proc.returncode if self.proc else None
            (self.run_dir / "meta.json").write_text(json.dumps(self.meta, indent=2, default=str))

    def __enter__(self) -> QemuVfGuest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

"""A guest's network: its synthetic NICs (netvsp) on hvlab's switch, next to the default responder.

This is composition only: netvsp is a VMBus device (hvlab.devices.netvsp), the switch and the responder
live in hvlab.net, and the VMM just offers the devices on its VMBus server. The default topology
(hvlab/net/topology.py, docs/DESIGN.md "Network"): NIC 0 gets the Hyper-V style MAC 00:15:5d:00:02:02
and, once the agent is up, 192.0.2.2/24 on whichever interface carries that MAC; the responder answers
ARP, ping and UDP echo at 192.0.2.1. Further NICs get 00:15:5d:00:02:03, ... and no address (several
interfaces in one subnet would make the guest's ARP and routing ambiguous; tests configure them).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from hvlab.errors import GuestError
from hvlab.net import topology
from hvlab.net.switch import mac_bytes, mac_str


def nic_mac(index: int) -> str:
    """00:15:5d:00:02:02 for NIC 0, then :03, :04, ... (Hyper-V's OUI, as Hyper-V assigns)."""
    base = int.from_bytes(mac_bytes(topology.GUEST_MAC), "big") + index
    return mac_str(base.to_bytes(6, "big"))


class GuestNetwork:
    """``nics`` synthetic NICs, each on its own switch port ("nic0", ...), plus the responder."""

    def __init__(self, nics: int, *, scheduler: Any, timeline: Any = None, pcap_dir: Path | None = None,
                 max_subchannels: int = 8) -> None:
        from hvlab.devices.netvsp import NetvspDevice

        self.topology = topology.default_topology(timeline=timeline, pcap_dir=pcap_dir)
        self.switch = self.topology.switch
        self.responder = self.topology.responder
        self.timeline = timeline
        self.nics: list[NetvspDevice] = []
        self.ports: list[Any] = []
        for i in range(nics):
            dev = NetvspDevice(nic_mac(i), name=f"netvsp{i}", scheduler=scheduler, timeline=timeline,
                               max_subchannels=max_subchannels)
            port = self.switch.add_port(f"nic{i}", dev.deliver)
            if pcap_dir is not None:
                port.set_pcap(Path(pcap_dir) / f"nic{i}.pcap")
            dev.attach_port(port)
            # The NIC's MAC is pinned to its synthetic port: frames for it go there from the first one,
            # not only after the guest has sent (learning). A VF port will take the pin when the guest
            # switches the data path to the VF (netvsp's on_data_path).
            self.switch.pin(nic_mac(i), port)
            dev.on_data_path = lambda path, i=i: self._data_path_changed(i, path)
            self.nics.append(dev)
            self.ports.append(port)

    def _data_path_changed(self, index: int, path: str) -> None:
        if self.timeline is not None:
            self.timeline.event("net.data_path", nic=f"netvsp{index}", path=path)

    @property
    def guest_mac(self) -> str:
        return nic_mac(0)

    def configure_guest(self, run, *, timeout: float = 30.0) -> str:
        """Give NIC 0's interface 192.0.2.2/24 through the agent (``run`` is GuestVM.run); returns the
        interface name. The interface is found by its MAC, so the name the guest chose does not matter."""
        if not self.nics:
            raise GuestError("this guest has no NIC")
        mac = self.guest_mac
        find = (f"n=0; while :; do for d in /sys/class/net/*; do "
                f"[ \"$(cat $d/address 2>/dev/null)\" = {shlex.quote(mac)} ] && {{ echo ${{d##*/}}; exit 0; }}; "
                f"done; n=$((n+1)); [ $n -gt 100 ] && exit 1; sleep 0.1; done")
        r = run(find, timeout=timeout)
        iface = r.stdout.strip()
        if r.returncode != 0 or not iface:
            raise GuestError(f"no guest interface with MAC {mac} appeared within 10 s (is hv_netvsc loaded? "
                             "see the run's console.log and timeline.jsonl)")
        r = run(topology.guest_ip_setup(iface, f"{topology.GUEST_IP}/{topology.GUEST_PREFIX}"), timeout=timeout)
        if r.returncode != 0:
            raise GuestError(f"configuring {iface} failed: {r.stderr.strip()}")
        return iface

    def snapshot(self) -> dict[str, Any]:
        ports = {}
        for name, port in self.switch.ports.items():
            c = port.counters
            ports[name] = {"rx_frames": c.rx_frames, "tx_frames": c.tx_frames, "drops": dict(c.drops)}
        return {"nics": [dev.snapshot() for dev in self.nics], "ports": ports}

    def close(self) -> None:
        self.topology.close()

"""``hvlab qemu``: boot an hvlab guest under QEMU with hvlab's VF NIC attached over vfio-user."""

from __future__ import annotations

import argparse
import sys
import time

from hvlab.cli import add_command

DESCRIPTION = """\
Boot an hvlab guest under QEMU (TCG) with a VF NIC that hvlab emulates, attached over vfio-user.

This is the interop check for hvlab's VF models: the device model runs in this process as a vfio-user
server, and QEMU's own vfio-user-pci client puts it on a pcie-root-port of a q35 machine, where the
guest's real driver (vmxnet3) binds to it.  QEMU >= 10.1 is needed; on a Debian 12 host hvlab installs
Debian trixie-backports' QEMU 11 into a debootstrapped trixie root under <cache>/qemu/ on first use
(about 30 s and 470 MB, with progress lines; the host's apt configuration is not touched).

The guest is the hvlab initramfs (busybox, the agent, vmxnet3) on a Debian cloud kernel (6.1, 6.12, 7.3)
or your own bzImage (--kernel PATH --modules DIR).  The VF's port on hvlab's switch shares the switch
with a responder at 192.0.2.1 (ARP, ping, UDP echo on port 7, flow sink); the guest's VF interface, found
by its MAC, gets 192.0.2.2/24 before COMMAND runs.

QEMU runs with TCG directly on this host (KVM here cannot run stock kernels); the accelerator is
recorded in meta.json.  With --hotplug the machine boots without the device and hvlab adds it through
QMP device_add; the model then offers MSI only, because QEMU 11.1.3 aborts on device_del of a
vfio-user device that has MSI-X.

Each run keeps console.log (ttyS0), qemu.argv, qemu.stderr, vf.pcap and responder.pcap, meta.json (device
counters, violations, port counters) and the qmp.sock/vf.sock sockets while it runs, under
<cache>/runs/<time>-qemu-<kernel>/.
"""

EPILOG = """\
exit status:
  with --exec, COMMAND's exit status; without, 0 after Ctrl-C
  2  usage or setup error (no QEMU root and not root, interface never appeared)
  4  the kernel asked for does not exist
  5  the guest did not answer (agent timeout) or QEMU stopped

examples:
  hvlab qemu --kernel 6.12 --vf vmxnet3 --exec 'ping -c 3 192.0.2.1'
  hvlab qemu --kernel 6.1 --vf vmxnet3 --mac 00:15:5d:aa:bb:cc --exec 'ip -br link'
  hvlab qemu --kernel 7.3 --vf vmxnet3 --hotplug --exec 'dmesg | grep vmxnet3'
  hvlab qemu --vf vmxnet3                 boot, configure, and keep running until Ctrl-C
  hvlab qemu --prepare                    build the QEMU 11 root now (install.sh does this)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "qemu", help="boot a guest under QEMU with an hvlab VF over vfio-user",
                    description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--kernel", default="6.12", metavar="6.1|6.12|7.3|PATH",
                   help="a Debian cloud kernel label or a bzImage path (default 6.12)")
    p.add_argument("--modules", metavar="DIR", help="modules tree (lib/modules/RELEASE) for --kernel PATH")
    p.add_argument("--vf", choices=["vmxnet3"], default="vmxnet3", help="the VF model (default vmxnet3)")
    p.add_argument("--mac", default=None, metavar="MAC", help="the VF's MAC (default 00:15:5d:00:02:02)")
    p.add_argument("--exec", dest="command", metavar="CMD", help="run CMD in the guest, print its output, "
                                                                 "exit with its status")
    p.add_argument("--prepare", action="store_true",
                   help="only build (or check) the QEMU 11 root and exit; the nested runner also uses it for L1")
    p.add_argument("--hotplug", action="store_true",
                   help="boot without the VF and add it through QMP device_add (MSI only)")
    p.add_argument("--msi-only", action="store_true", help="offer MSI but no MSI-X capability")
    p.add_argument("--max-revision", type=int, default=3, choices=[1, 2, 3, 4],
                   help="highest vmxnet3 revision offered in VRRS (default 3)")
    p.add_argument("--mem", type=int, default=512, metavar="MIB", help="guest RAM in MiB (default 512)")
    p.add_argument("--timeout", type=float, default=300, metavar="SECONDS",
                   help="limit for boot and for CMD (default 300)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hvlab import progress
    from hvlab.net.switch import mac_bytes
    from hvlab.net.topology import GUEST_MAC
    from hvlab.qemu.runner import QemuVfConfig, QemuVfGuest

    if args.prepare:
        from hvlab.qemu.root import QemuRoot

        root = QemuRoot().ensure()
        progress.say(f"QEMU root ready: {root.path} ({root.version()})")
        return 0
    mac = args.mac or GUEST_MAC
    try:
        mac_bytes(mac)
    except ValueError as e:
        from hvlab.errors import HvlabError

        raise HvlabError(f"--mac: {e}") from None
    config = QemuVfConfig(kernel=args.kernel, modules=args.modules, mac=mac,
                          msix=not (args.hotplug or args.msi_only), cold_plug=not args.hotplug,
                          max_revision=args.max_revision, memory_mb=args.mem, boot_timeout=args.timeout)
    with QemuVfGuest(config) as g:
        if args.hotplug:
            with progress.step("hot-plugging the VF (QMP device_add)"):
                g.plug()
        iface = g.setup_network()
        progress.say(f"VF interface {iface} ({mac}) has 192.0.2.2/24; run directory {g.run_dir}")
        if args.command is None:
            progress.say("guest running; Ctrl-C ends it")
            try:
                while g.alive():
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
            return 0
        result = g.run(args.command, timeout=args.timeout)
        sys.stdout.buffer.write(result.stdout_bytes)
        sys.stdout.flush()
        sys.stderr.buffer.write(result.stderr_bytes)
        sys.stderr.flush()
        return result.returncode

"""``hvlab vf serve``: run a VF NIC model as a standalone vfio-user server."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from hvlab.cli import add_command

DESCRIPTION = """\
Serve one of hvlab's VF NIC models over vfio-user on a Unix socket until Ctrl-C.

Any vfio-user client can use it: QEMU >= 10.1 with
  -device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"SOCKET"}}'
(and share=on guest memory, e.g. -object memory-backend-memfd,id=mem,size=1G,share=on
-machine memory-backend=mem), or hvlab's own VMM.  Clients are served one after another: every QEMU
device_add connects anew and finds the NIC's MAC, link state and counters where the last one left them.

The model's frames go to a port on an hvlab switch of its own, with a responder at 192.0.2.1 that answers
ARP, ping and UDP echo (port 7) and counts UDP flows; --pcap captures the VF's port.  Malformed guest
state (bad DMA addresses, ring sizes, descriptors) is logged as a protocol violation and stops the
affected queue; it never stops the server.

vmxnet3: PCI 15AD:07B0; BAR0 interrupt masks and doorbells, BAR1 registers (revisions 1..N offered
through VRRS, see --max-revision), BAR2 MSI-X table (25 vectors) unless --msi-only; MSI and INTx too.
"""

EPILOG = """\
exit status:
  0  stopped with Ctrl-C (or SIGTERM)
  2  usage error (bad MAC, socket path not usable)

examples:
  hvlab vf serve vmxnet3 --socket /tmp/vf.sock --mac 00:15:5d:00:02:02
  hvlab vf serve vmxnet3 --socket /tmp/vf.sock --mac 00:15:5d:00:02:02 --msi-only --pcap /tmp/vf.pcap
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "vf", help="VF NIC models over vfio-user (hvlab vf serve ...)",
                    description=DESCRIPTION, epilog=EPILOG)
    vsub = p.add_subparsers(title="commands", metavar="COMMAND")
    s = add_command(vsub, "serve", help="serve a VF model on a vfio-user socket until Ctrl-C",
                    description=DESCRIPTION, epilog=EPILOG)
    s.add_argument("model", choices=["vmxnet3"], help="the device model")
    s.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on")
    s.add_argument("--mac", required=True, metavar="MAC", help="the NIC's permanent MAC address")
    s.add_argument("--pcap", metavar="FILE", help="capture the VF's switch port to FILE")
    s.add_argument("--msi-only", action="store_true", help="no MSI-X capability (for QEMU hot-unplug)")
    s.add_argument("--max-revision", type=int, default=3, choices=[1, 2, 3, 4],
                   help="highest vmxnet3 revision offered (default 3)")
    s.add_argument("-v", "--verbose", action="store_true", help="log every vfio-user and device event")
    s.set_defaults(func=serve)
    p.set_defaults(func=lambda _a: (p.print_help(), 2)[1])


def serve(args: argparse.Namespace) -> int:
    from hvlab import progress
    from hvlab.errors import HvlabError
    from hvlab.net.topology import default_topology
    from hvlab.vf.vmxnet3 import Vmxnet3
    from hvlab.vfio_user.server import VfioUserServer

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        dev = Vmxnet3(args.mac, msix=not args.msi_only, max_revision=args.max_revision)
    except ValueError as e:
        raise HvlabError(f"--mac: {e}") from None
    topo = default_topology()
    port = topo.switch.add_port("vf", dev.deliver)
    if args.pcap:
        port.set_pcap(args.pcap)
    dev.attach(port)
    try:
        server = VfioUserServer(dev, args.socket)
        server.listen()
    except OSError as e:
        topo.close()
        raise HvlabError(f"cannot listen on {args.socket}: {e.strerror or e}") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    progress.say(f"serving vmxnet3 {args.mac} on {args.socket}; responder 192.0.2.1; Ctrl-C stops")
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        topo.close()
        progress.say(f"stopped after {server.connections_served} connection(s); device counters "
                     f"{dict(dev.counters)}; port {port.counters.snapshot()}")
    return 0

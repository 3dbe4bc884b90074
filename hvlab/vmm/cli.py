"""``hvlab boot``: boot a Linux guest under hvlab's VMM, run a command in it or give a console."""

from __future__ import annotations

import argparse
import sys

from hvlab.cli import add_command

DESCRIPTION = """\
Boot a real Linux kernel under hvlab's own VMM (Python on /dev/kvm, no QEMU).

The kernel is one of Debian's cloud kernels (fetched into the cache on first use: 6.1, 6.12 or 7.3), or
your own bzImage with --kernel PATH and its modules tree with --modules DIR.  hvlab builds an initramfs
with busybox, the Hyper-V modules and the guest agent, boots it with a quiet console, and then either
runs --exec COMMAND in the guest (its output on stdout and stderr, its exit status as hvlab's) or, without
--exec, connects the guest console to this terminal.

Where KVM here cannot run stock guests, the whole command runs inside the nested runner's L1 VM (see
`hvlab doctor`); that is transparent apart from the time it takes.

The guest runs on an emulated Hyper-V: hv_vmbus finds a VMBus with the Heartbeat, Shutdown and TimeSync
services (hv_utils) and, by default, one synthetic NIC (hv_netvsc) on hvlab's virtual switch.  The
default network: the guest's NIC has MAC 00:15:5d:00:02:02 and 192.0.2.2/24 (set through the agent
before COMMAND runs); a responder at 192.0.2.1 answers ARP, ping and UDP echo (port 7).  192.0.2.0/24
is a documentation range: nothing leaves hvlab's switch.  The run ends through the Shutdown service,
as on Hyper-V.

Each run keeps its files under <cache>/runs/<time>-<kernel>/: console.log (the guest console, complete
even when quiet), timeline.jsonl (every VMBus message, channel change, NVSP/RNDIS control message and
console line, timestamped), meta.json (exit counts, VMBus and NIC counters, stop reason) and, with
--pcap, a pcap per switch port.
"""

EPILOG = """\
exit status:
  with --exec, COMMAND's exit status; without, 0 when the guest powers off
  5  the guest did not answer (agent timeout) or stopped before COMMAND finished
  6  the guest kernel panicked (the panic text is in console.log)
  7  the VMM failed (unexpected exit, triple fault)
  130 interrupted (Ctrl-C)

examples:
  hvlab boot --kernel 6.12 --exec 'uname -r; nproc'
  hvlab boot --kernel 6.12 --exec 'cat /sys/class/net/eth0/address; ping -c 3 192.0.2.1'
  hvlab boot --kernel 6.1 --pcap --exec 'ping -c 1 192.0.2.1'   then read runs/*/nic0.pcap
  hvlab boot --kernel 7.3 --smp 4 --mem 2G --exec 'dmesg | grep -i hyper-v'
  hvlab boot --kernel ~/linux/arch/x86/boot/bzImage --modules ~/linux-mods/lib/modules/7.3.0 --exec 'lsmod'
  hvlab boot --kernel 6.1 --verbose          interactive console, full kernel log
"""


def parse_size(text: str) -> int:
    """'1024', '1024M', '2G' -> MiB."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if t.endswith("G"):
            return int(float(t[:-1]) * 1024)
        if t.endswith("M"):
            return int(t[:-1])
        return int(t)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 1024M or 2G)") from exc


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "boot", help="boot a Linux guest under hvlab's VMM", description=DESCRIPTION,
                    epilog=EPILOG)
    p.add_argument("--kernel", default="6.12", metavar="6.1|6.12|7.3|PATH",
                   help="a cached/fetchable Debian cloud kernel label, or a bzImage path (default 6.12)")
    p.add_argument("--modules", metavar="DIR", help="modules tree (lib/modules/RELEASE) for --kernel PATH")
    p.add_argument("--smp", type=int, default=2, metavar="N", help="vCPUs (default 2)")
    p.add_argument("--mem", type=parse_size, default=1024, metavar="SIZE", help="guest RAM (default 1024M)")
    p.add_argument("--append", default="", metavar="ARGS", help="extra kernel command-line arguments")
    p.add_argument("--exec", dest="command", metavar="CMD", help="run CMD in the guest, then power off")
    p.add_argument("--timeout", type=float, default=300, metavar="SECONDS",
                   help="limit for boot and for CMD (default 300)")
    p.add_argument("--verbose", action="store_true", help="full kernel log, echoed to stderr")
    p.add_argument("--nics", type=int, default=1, metavar="N",
                   help="synthetic NICs (hv_netvsc) on hvlab's switch; 0 for none (default 1)")
    p.add_argument("--pcap", action="store_true", help="write a pcap per switch port into the run directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hvlab import placement
    from hvlab.guest import kernels

    kernel = kernels.resolve(args.kernel, args.modules)
    kernels.require_drivers(kernel)
    nested = placement.reexec_nested_if_needed(sys.argv[1:], timeout=args.timeout * 3 + 120)
    if nested is not None:
        return nested
    from hvlab.vmm.guestvm import GuestVM, GuestVMConfig

    config = GuestVMConfig(kernel=kernel, smp=args.smp, mem_mb=args.mem, append=args.append,
                           verbose=args.verbose, boot_timeout=args.timeout, nics=args.nics, pcap=args.pcap)
    with GuestVM(config) as vm:
        if args.command is None:
            return vm.interactive()
        vm.wait_ready()
        result = vm.agent.run(args.command, timeout=args.timeout)
        sys.stdout.buffer.write(result.stdout_bytes)
        sys.stdout.flush()
        sys.stderr.buffer.write(result.stderr_bytes)
        sys.stderr.flush()
        vm.shutdown()
        return result.returncode

"""``hvlab kernel``: fetch, list and inspect guest kernels; build the default guest initramfs."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from hvlab import paths
from hvlab.cli import add_command

DESCRIPTION = """\
Manage the kernels hvlab boots as guests.

hvlab tests Linux's own Hyper-V guest drivers (hv_vmbus, hv_netvsc, pci-hyperv), so a guest kernel must
have them, built in or as modules.  Debian's cloud kernels do; hvlab fetches them as Debian packages
(with apt-get and a private apt state under the cache: the host's apt configuration is not touched) and
unpacks vmlinuz and the modules tree into the cache.

labels:
  6.1        Debian 12 (bookworm) cloud kernel, newest 6.1 in bookworm/-updates/-security
  6.12       Debian 13 (trixie) cloud kernel, newest 6.12 in trixie/-updates/-security (the default)
  7.3        newest 7.3 cloud kernel in trixie-backports (any newer series works the same: 7.2, 7; the
             exact release fetched is recorded in kernel.json)
  l1-6.12    trixie's generic amd64 kernel, for the nested runner's L1 VM (9p, overlay, kvm_amd modules)
  RELEASE    an exact release such as 6.12.118+deb13-cloud-amd64

The newest package is chosen when a label is first fetched; later fetches reuse the cache until
--refresh.  Anywhere a kernel is accepted, --kernel PATH --modules DIR takes your own build instead:
PATH a bzImage, DIR either .../lib/modules/<release> or the INSTALL_MOD_PATH of `make modules_install`.
"""

EPILOG = """\
examples:
  hvlab kernel fetch 6.1 6.12 7.3      fetch the three cloud kernels the tests use
  hvlab kernel list                    what is cached, and whether the Hyper-V drivers are in it
  hvlab kernel initramfs --kernel 6.12 build the default guest initramfs, print its path
  hvlab kernel initramfs --kernel ~/linux/arch/x86/boot/bzImage --modules /tmp/mods -o guest.cpio.gz

files:
  <cache>/kernels/<label>/kernel.json  what was fetched: release, packages, versions, SHA256s, drivers
  <cache>/kernels/<label>/             the unpacked packages (boot/ or usr/lib/modules/<release>/vmlinuz)
  <cache>/apt/                         hvlab's private sources.list, package lists and apt cache
  <cache>/initramfs/<hash>.cpio.gz     built images, keyed by the hash of everything in them

exit status:
  0 success; 2 download or other error; 4 unknown label, missing file, or a kernel without the drivers
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "kernel", help="fetch, list and inspect guest kernels", description=DESCRIPTION,
                    epilog=EPILOG)
    ksub = p.add_subparsers(title="kernel commands", metavar="ACTION")

    f = ksub.add_parser("fetch", help="fetch Debian kernels into the cache",
                        description="Fetch the kernels for LABEL... (see `hvlab kernel --help`) into the cache.")
    f.add_argument("labels", nargs="+", metavar="LABEL")
    f.add_argument("--refresh", action="store_true", help="re-resolve the newest package even if cached")
    f.set_defaults(func=cmd_fetch)

    ls = ksub.add_parser("list", help="list cached kernels", description="List the kernels in the cache.")
    ls.add_argument("--json", action="store_true", help="print kernel.json of each kernel")
    ls.set_defaults(func=cmd_list)

    i = ksub.add_parser("initramfs", help="build the default guest initramfs and print its path",
                        description="Build (or reuse) the default hvlab guest initramfs for a kernel: "
                        "busybox, hv_vmbus, hv_netvsc, pci-hyperv, hv_utils and vmxnet3 when present, "
                        "hvlab's /init and agent.  Prints the image's path.")
    i.add_argument("--kernel", metavar="LABEL|PATH", help="kernel label (default 6.12) or bzImage path")
    i.add_argument("--modules", metavar="DIR", help="modules tree for --kernel PATH")
    i.add_argument("--module", action="append", default=[], metavar="NAME",
                   help="also include module NAME with its dependencies (repeatable)")
    i.add_argument("-o", "--output", type=Path, metavar="FILE", help="copy the image to FILE")
    i.set_defaults(func=cmd_initramfs)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def cmd_fetch(args: argparse.Namespace) -> int:
    from hvlab.guest import kernels

    for label in args.labels:
        k = kernels.fetch(label, refresh=args.refresh)
        print(f"{k.label}\t{k.release}\t{k.vmlinuz}")
    return 0


def _drivers_text(status: dict[str, str | None]) -> str:
    short = {"builtin": "y", "module": "m", None: "-"}
    return " ".join(f"{n}={short[s]}" for n, s in status.items())


def cmd_list(args: argparse.Namespace) -> int:
    import json

    from hvlab.guest import kernels

    ks = kernels.list_cached()
    if args.json:
        print(json.dumps([k.info for k in ks], indent=2))
        return 0
    if not ks:
        print(f"no kernels in {paths.cache_dir() / 'kernels'}; try `hvlab kernel fetch 6.12`", file=sys.stderr)
        return 0
    rows = [("LABEL", "RELEASE", "FLAVOUR", "VERSION", "DRIVERS (y built in, m module, - missing)")]
    for k in ks:
        status = k.info.get("drivers") or k.driver_status()
        status = {n: status.get(n) for n in (*kernels.REQUIRED_DRIVERS, "hv_utils", "vmxnet3")}
        rows.append((k.label, k.release, k.flavour, k.info.get("version", ""), _drivers_text(status)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return 0


def cmd_initramfs(args: argparse.Namespace) -> int:
    from hvlab.guest import initramfs, kernels

    k = kernels.resolve(args.kernel, args.modules)
    out = initramfs.build_guest_initramfs(k, extra_modules=args.module)
    if args.output:
        shutil.copyfile(out, args.output)
        out = args.output
    print(out)
    return 0

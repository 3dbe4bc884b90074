"""The ``hvlab`` command line: one sub-command per job, each registered by the room that owns it.

Each module listed in ``COMMANDS`` defines ``register(subparsers)``, which adds its sub-command and sets
``func`` (taking the parsed namespace, returning an exit code).  Keeping registration with the room keeps
this file free of any room's details.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hvlab import __version__, progress
from hvlab.errors import HvlabError

COMMANDS = [
    "hvlab.doctor",
    "hvlab.guest.cli",
    "hvlab.nested.cli",
    "hvlab.qemu.cli",
    "hvlab.vf.cli",
    "hvlab.vmm.cli",
]

DESCRIPTION = """\
hvlab emulates the host side of Hyper-V on an ordinary Linux machine so that Linux's own guest drivers
(hv_vmbus, hv_netvsc, pci-hyperv and a VF NIC driver) can be booted, exercised and regression-tested
without Hyper-V or Azure.

Where /dev/kvm can run stock x86-64 guests, hvlab's VMM runs on it directly.  Where it cannot (no
/dev/kvm, or a KVM such as kvm_pvm that only runs paravirtualised kernels), hvlab runs the same command
inside an L1 virtual machine under QEMU (TCG with nested SVM) in which KVM works: the "nested runner".
`hvlab doctor` says which applies here.
"""

EPILOG = """\
exit status:
  0  success (or, for commands that run something in a guest, that command's own exit status)
  2  usage or other error, explained on stderr
  3  KVM is not usable and the nested runner is not available either
  4  a kernel, module, file or package that was asked for does not exist
  5  the guest died, timed out or did not answer

environment:
  HVLAB_CACHE     cache directory (default: $XDG_CACHE_HOME/hvlab or ~/.cache/hvlab)
  HVLAB_RUNS      where per-run logs go (default: <cache>/runs)
  HVLAB_NESTED    "never" to refuse the nested runner, "always" to use it even where KVM is usable

examples:
  hvlab doctor                                  what can run here, and how
  hvlab kernel fetch 6.12                       fetch Debian's 6.12 cloud kernel into the cache
  hvlab exec -- python3 -c 'print(1)'           run a command where KVM is usable
  hvlab boot --kernel 6.12 --exec 'uname -r'    boot a guest, run one command in it

Each command has its own --help.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hvlab",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hvlab {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):  # a room listed here but not installed
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress.set_quiet(args.quiet)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HvlabError as exc:
        print(f"hvlab: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hvlab: interrupted", file=sys.stderr)
        return 130


def add_command(sub: argparse._SubParsersAction, name: str, *, help: str, description: str,
                epilog: str = "") -> argparse.ArgumentParser:
    """Add a sub-command whose --help keeps its paragraphs (man-page style)."""
    return sub.add_parser(name, help=help, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)

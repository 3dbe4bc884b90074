"""``hvlab exec``: run a command where KVM is usable, natively or through the nested runner."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hvlab import progress
from hvlab.cli import add_command
from hvlab.errors import HvlabError

DESCRIPTION = """\
Run COMMAND where KVM can run stock x86-64 guests.

If /dev/kvm here passes hvlab's probe (see `hvlab doctor`), COMMAND simply runs here.  Otherwise hvlab
starts an L1 virtual machine under QEMU (TCG, emulated AMD CPU with SVM and nested paging), in which
kvm_amd works, and runs COMMAND there: the L1 sees this machine's files at the same paths (read-only,
with a throw-away overlay for writes), except for hvlab's cache directory and any --rw directories,
which are shared writable.  COMMAND's stdout and stderr are streamed back and its exit status becomes
hvlab's.  No stdin or terminal is needed; Ctrl-C stops the L1 VM.

Starting a Python process inside L1 takes seconds (the files come over 9p), so prefer one long command
(a whole pytest session) to many short ones.
"""

EPILOG = """\
exit status:
  COMMAND's own exit status; 2 if the L1 VM failed or timed out; 3 if neither native KVM nor the nested
  runner can be used; 130 on Ctrl-C.

environment:
  HVLAB_NESTED=always|never   force or forbid the nested runner

examples:
  hvlab exec -- python3 -c "import os; os.open('/dev/kvm', os.O_RDWR); print('kvm ok')"
  hvlab exec --rw ./results -- python3 -m pytest -m kvm --junitxml=results/kvm.xml
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "exec", help="run a command where KVM is usable (natively or nested)",
                    description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--nested", action="store_true", help="use the nested runner even if KVM is usable here")
    p.add_argument("--mem", type=int, default=6144, metavar="MIB", help="L1 memory in MiB (default 6144)")
    p.add_argument("--smp", type=int, default=2, metavar="N", help="L1 vCPUs (default 2)")
    p.add_argument("--timeout", type=float, default=3600, metavar="SECONDS",
                   help="kill the L1 VM after this long (default 3600)")
    p.add_argument("--rw", type=Path, action="append", default=[], metavar="DIR",
                   help="share DIR writable into L1 at the same path (repeatable); the cache dir always is")
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="keep the L1 exchange directory (console log, command script) under DIR")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hvlab import placement
    from hvlab.nested.runner import NestedConfig, run_nested

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise HvlabError("hvlab exec: no command given (hvlab exec -- COMMAND ...)")
    where = "nested" if args.nested else placement.choose()
    if where == "native":
        progress.say("KVM is usable here: running the command directly")
        os.execvp(command[0], command)
    config = NestedConfig(memory_mb=args.mem, cpus=args.smp, timeout=args.timeout,
                          writable=[d.resolve() for d in args.rw], keep_dir=args.keep)
    result = run_nested(command, config)
    progress.say(f"L1 VM finished in {result.seconds:.1f} s, exit status {result.returncode}")
    return result.returncode

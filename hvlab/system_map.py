"""Kernel addresses to ``function+0xoffset``, from a System.map or a saved /proc/kallsyms (same format).

Why: when a VM's kernel stops making progress without saying so on its console (every CPU stuck, so no
watchdog runs), the only evidence left is where its CPUs are, and a bare RIP means nothing in a CI log.
The kernel must run without KASLR (``nokaslr``) for saved addresses to be the live ones.  Debian's
packaged System.map is a one-line stub, so hvlab saves a booted kernel's /proc/kallsyms instead.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

TEXT_TYPES = frozenset("tTwW")
"""System.map symbol types that are code (text, weak text); data symbols would name the wrong thing."""


@dataclass(frozen=True)
class SystemMap:
    addresses: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> SystemMap:
        """Read ``address type name [module]`` lines (``nm``, kallsyms); others are skipped."""
        symbols = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 3 or parts[1] not in TEXT_TYPES or parts[2].startswith("__pfx_"):
                continue  # __pfx_: the padding before each function (CONFIG_CALL_PADDING), not a function
            try:
                symbols.append((int(parts[0], 16), parts[2]))
            except ValueError:
                continue
        symbols.sort()
        return cls(tuple(a for a, _ in symbols), tuple(n for _, n in symbols))

    @classmethod
    def load(cls, path: Path) -> SystemMap:
        return cls.parse(path.read_text(errors="replace"))

    def lookup(self, address: int) -> str | None:
        """``name+0xoff`` of the code symbol at or below ``address``; None below the first symbol (user
        space) or more than 1 MiB past the nearest one (no function is that long: code the map lacks,
        such as an L2 guest's kernel)."""
        i = bisect.bisect_right(self.addresses, address) - 1
        if i < 0:
            return None
        offset = address - self.addresses[i]
        if offset > 0x100000:
            return None
        return f"{self.names[i]}+{offset:#x}"

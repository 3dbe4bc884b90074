"""The synthetic interrupt controller: per-VP message page, event-flag page and SINT registers.

Host-to-guest channel messages go into the VP's message page slot for the SINT (256 bytes per SINT);
a slot that is still occupied gets its msg_pending flag set and the message waits until the guest writes
EOM (HOST_CONTRACT.md 2.2).  Channel interrupts set the relid's bit in the event-flag page for the SINT
(2.3).  Either way the vCPU is interrupted on the vector the guest programmed into the SINT, unless the
SINT is masked or the SynIC or page is disabled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hvlab.hyperv import msrs

PAGE = 4096
SLOT = 256
MSG_PENDING_OFFSET = 5  # hv_message.header.message_flags, bit 0


@dataclass
class VpSynic:
    """One VP's SynIC registers."""

    index: int
    scontrol: int = 0
    simp: int = 0
    siefp: int = 0
    sint: list[int] = field(default_factory=lambda: [msrs.SINT_MASKED] * 16)

    @property
    def enabled(self) -> bool:
        return bool(self.scontrol & 1)


class Synic:
    """All VPs' SynIC state plus delivery into guest memory.

    ``ram`` has ``contains``/``view_at`` (hvlab.kvm.memory.GuestMemory); ``inject(vp, vector)`` raises
    the interrupt (the platform does it with KVM_SIGNAL_MSI).  ``on_eom(vp)`` is called when the guest
    frees a slot, so the VMBus server can retry a queued message.
    """

    def __init__(self, nr_vps: int, ram, inject: Callable[[int, int], None]) -> None:
        self.vps = [VpSynic(i) for i in range(nr_vps)]
        self.ram = ram
        self.inject = inject
        self.on_eom: Callable[[int], None] = lambda vp: None
        self.stats = {"messages": 0, "busy": 0, "events": 0, "dropped": 0}

    def _page(self, reg: int, sint: int) -> memoryview | None:
        if not reg & msrs.PAGE_ENABLE:
            return None
        gpa = (reg & ~0xFFF) + sint * SLOT
        if not self.ram.contains(gpa, SLOT):
            return None
        return self.ram.view_at(gpa, SLOT)

    def _interrupt(self, vp: VpSynic, sint: int) -> None:
        reg = vp.sint[sint]
        if vp.enabled and not reg & msrs.SINT_MASKED:
            self.inject(vp.index, reg & msrs.SINT_VECTOR_MASK)

    def post(self, vp_index: int, sint: int, message: bytes) -> bool:
        """Put a complete 256-byte hv_message into the slot; False (msg_pending set) if it is occupied."""
        if not 0 <= vp_index < len(self.vps):
            self.stats["dropped"] += 1
            return False
        vp = self.vps[vp_index]
        slot = self._page(vp.simp, sint) if vp.enabled else None
        if slot is None:
            self.stats["dropped"] += 1
            return False
        if int.from_bytes(slot[0:4], "little") != 0:
            slot[MSG_PENDING_OFFSET] = slot[MSG_PENDING_OFFSET] | 1
            self.stats["busy"] += 1
            return False
        slot[4:SLOT] = message[4:SLOT]
        slot[0:4] = message[0:4]  # message_type last: the guest polls it
        self.stats["messages"] += 1
        self._interrupt(vp, sint)
        return True

    def signal_event(self, vp_index: int, sint: int, flag: int) -> None:
        """Set event flag ``flag`` (a relid) for ``sint`` and interrupt the VP."""
        if not 0 <= vp_index < len(self.vps) or not 0 <= flag < SLOT * 8:
            self.stats["dropped"] += 1
            return
        vp = self.vps[vp_index]
        flags = self._page(vp.siefp, sint) if vp.enabled else None
        if flags is None:
            self.stats["dropped"] += 1
            return
        byte, bit = divmod(flag, 8)
        flags[byte] = flags[byte] | (1 << bit)
        self.stats["events"] += 1
        self._interrupt(vp, sint)

    # MSR access ------------------------------------------------------------------------------------------

    def read_msr(self, vp_index: int, index: int) -> int | None:
        vp = self.vps[vp_index]
        if index == msrs.SCONTROL:
            return vp.scontrol
        if index == msrs.SVERSION:
            return 1
        if index == msrs.SIEFP:
            return vp.siefp
        if index == msrs.SIMP:
            return vp.simp
        if index == msrs.EOM:
            return 0
        if msrs.SINT0 <= index <= msrs.SINT15:
            return vp.sint[index - msrs.SINT0]
        return None

    def write_msr(self, vp_index: int, index: int, value: int) -> bool:
        vp = self.vps[vp_index]
        if index == msrs.SCONTROL:
            vp.scontrol = value & 1
        elif index == msrs.SIEFP:
            vp.siefp = value & ~0xFFE
        elif index == msrs.SIMP:
            vp.simp = value & ~0xFFE
        elif index == msrs.EOM:
            self.on_eom(vp_index)
        elif msrs.SINT0 <= index <= msrs.SINT15:
            vp.sint[index - msrs.SINT0] = value & (msrs.SINT_VECTOR_MASK | msrs.SINT_MASKED | msrs.SINT_AUTO_EOI
                                                   | (1 << 18))
        elif index == msrs.SVERSION:
            return False
        else:
            return False
        return True

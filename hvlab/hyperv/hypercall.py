"""The hypercall page and hypercall decoding (HOST_CONTRACT.md 1.4).

The guest calls into a page the host fills.  hvlab's stub (source ``stub.S`` beside this file, 23 bytes):

    endbr64                       ; 6.12 with CET-IBT disables IBT and warns without it
    cmp rcx, 0x1005D              ; HvSignalEvent, fast?
    jne slow
    mov eax, edx                  ; the connection id
    out 0xE4, eax                 ; -> a KVM ioeventfd per channel: completes in the kernel, no exit
    xor eax, eax                  ; HV_STATUS_SUCCESS
    ret
  slow:
    out 0xE0, al                  ; -> user space: the VMM reads RCX/RDX/R8 and sets RAX
    ret

so the channel doorbell (the hot path) never leaves the kernel, and every other hypercall traps to the VMM.
"""

from __future__ import annotations

from dataclasses import dataclass

STUB = bytes.fromhex("f30f1efa4881f95d000100750789d0e7e431c0c3e6e0c3")
SLOW_PORT = 0xE0
FAST_PORT = 0xE4

HVCALL_POST_MESSAGE = 0x005C
HVCALL_SIGNAL_EVENT = 0x005D
HVCALL_RETARGET_INTERRUPT = 0x007E

HV_STATUS_SUCCESS = 0
HV_STATUS_INVALID_HYPERCALL_CODE = 2
HV_STATUS_INVALID_HYPERCALL_INPUT = 3
HV_STATUS_INVALID_ALIGNMENT = 4
HV_STATUS_INVALID_PARAMETER = 5
HV_STATUS_INSUFFICIENT_MEMORY = 11
HV_STATUS_INVALID_CONNECTION_ID = 18

POST_MESSAGE_INPUT_SIZE = 256
POST_MESSAGE_MAX_PAYLOAD = 240


@dataclass(frozen=True)
class Control:
    """The hypercall control word in RCX."""

    code: int
    fast: bool
    var_header: int
    rep_count: int
    rep_start: int

    @classmethod
    def decode(cls, rcx: int) -> Control:
        return cls(code=rcx & 0xFFFF, fast=bool(rcx >> 16 & 1), var_header=rcx >> 17 & 0x3FF,
                   rep_count=rcx >> 32 & 0xFFF, rep_start=rcx >> 48 & 0xFFF)

"""Hyper-V's CPUID leaves (HOST_CONTRACT.md 0 and 1.1-1.2): what makes Linux see Hyper-V.

Chosen bits: SynIC, hypercall page, VP index, frequency MSRs and invariant TSC (leaf 3 EAX 0x8864);
post-message and signal-event privileges (EBX 0x30); frequency MSRs available (EDX bit 8); and
"deprecating AEOI" (leaf 4 EAX bit 9), without which the guest programs SINT2 with auto-EOI and never
EOIs vector 0xF3.  Never set: partition-id access, CPU management, isolation, nested (they send the
guest down paths that crash or skip VMBus).
"""

from __future__ import annotations

from hvlab.kvm import abi
from hvlab.vmm.cpuid import entry

MAX_LEAF = 0x40000006
SIGNATURE = b"Microsoft Hv"
INTERFACE_HV1 = 0x31237648  # "Hv#1"

FEAT_SYNIC = 1 << 2
FEAT_HYPERCALL = 1 << 5
FEAT_VP_INDEX = 1 << 6
FEAT_ACCESS_FREQUENCY_MSRS = 1 << 11
FEAT_ACCESS_TSC_INVARIANT = 1 << 15
PRIV_POST_MESSAGES = 1 << 4
PRIV_SIGNAL_EVENTS = 1 << 5
MISC_FREQUENCY_MSRS_AVAILABLE = 1 << 8
HINT_DEPRECATING_AEOI = 1 << 9

FEATURES_EAX = FEAT_SYNIC | FEAT_HYPERCALL | FEAT_VP_INDEX | FEAT_ACCESS_FREQUENCY_MSRS | FEAT_ACCESS_TSC_INVARIANT
FEATURES_EBX = PRIV_POST_MESSAGES | PRIV_SIGNAL_EVENTS
FEATURES_EDX = MISC_FREQUENCY_MSRS_AVAILABLE
HINTS_EAX = HINT_DEPRECATING_AEOI


def hyperv_leaves(max_vps: int = 64) -> list[abi.kvm_cpuid_entry2]:
    """The 0x400000xx leaves; everything else in that range reads as zero (7.3 reads 0x40000082)."""
    b, c, d = (int.from_bytes(SIGNATURE[i:i + 4], "little") for i in (0, 4, 8))
    return [
        entry(0x40000000, MAX_LEAF, b, c, d),
        entry(0x40000001, INTERFACE_HV1),
        entry(0x40000002, 20348, 0x000A0000, 0, 0),  # build 20348, version 10.0 (printed by the guest)
        entry(0x40000003, FEATURES_EAX, FEATURES_EBX, 0, FEATURES_EDX),
        entry(0x40000004, HINTS_EAX, 0xFFFFFFFF),  # EBX: spinlock retries "never notify"
        entry(0x40000005, max_vps, max_vps),
        entry(0x40000006),
        entry(0x40000081),
        entry(0x40000082),
    ]

"""The guest's CPUID: what KVM supports, minus KVM's own paravirt identity.

The guest must not see KVM's "KVMKVMKVM" leaves: Linux picks the hypervisor whose detector returns the
highest priority and KVM's (its CPUID base, e.g. 0x40000100) beats Hyper-V's 0x40000000, after which
hv_vmbus and pci-hyperv refuse to load (HOST_CONTRACT.md 1.1).  So every 0x4000xxxx leaf is dropped here;
the Hyper-V platform adds its own leaves through ``extra``.
"""

from __future__ import annotations

from collections.abc import Iterable

from hvlab.kvm import abi

HYPERVISOR_LEAVES = range(0x40000000, 0x50000000)
CPUID_1_ECX_HYPERVISOR = 1 << 31


def guest_cpuid(supported: Iterable[abi.kvm_cpuid_entry2], vcpu_index: int,
                extra: Iterable[abi.kvm_cpuid_entry2] = ()) -> list[abi.kvm_cpuid_entry2]:
    """CPUID entries for one vCPU: supported leaves without KVM's identity, APIC id patched in."""
    out: list[abi.kvm_cpuid_entry2] = []
    for e in supported:
        if e.function in HYPERVISOR_LEAVES:
            continue
        e = abi.kvm_cpuid_entry2.from_buffer_copy(e)
        if e.function == 1:
            e.ecx |= CPUID_1_ECX_HYPERVISOR
            # initial APIC id; without it Linux warns "APIC ID mismatch" and may misnumber CPUs
            e.ebx = (e.ebx & 0x00FFFFFF) | (vcpu_index << 24)
        elif e.function in (0x0B, 0x1F):
            e.edx = vcpu_index  # x2APIC id
        out.append(e)
    out.extend(abi.kvm_cpuid_entry2.from_buffer_copy(e) for e in extra)
    return out


def entry(function: int, eax: int = 0, ebx: int = 0, ecx: int = 0, edx: int = 0,
          index: int = 0) -> abi.kvm_cpuid_entry2:
    return abi.kvm_cpuid_entry2(function=function, index=index, eax=eax, ebx=ebx, ecx=ecx, edx=edx)

"""The guest's CPUID: what KVM supports, minus KVM's own paravirt identity.

The guest must not see KVM's "KVMKVMKVM" leaves: Linux picks the hypervisor whose detector returns the
highest priority and KVM's (its CPUID base, e.g. 0x40000100) beats Hyper-V's 0x40000000, after which
hv_vmbus and pci-hyperv refuse to load (HOST_CONTRACT.md 1.1).  So every 0x4000xxxx leaf is dropped here;
the Hyper-V platform adds its own leaves through ``extra``.

The guest's XCR0 is also decided here (:func:`guest_xcr0`), because KVM computes CPUID leaf 0xD.0 EBX
(the XSAVE area size for the enabled features) from the XCR0 *it* knows, and Linux compares that size
with the one it adds up from the per-feature leaves.  See :func:`guest_xcr0` for why the VMM must set it.
"""

from __future__ import annotations

from collections.abc import Iterable

from hvlab.kvm import abi

HYPERVISOR_LEAVES = range(0x40000000, 0x50000000)
CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_ECX_XSAVE = 1 << 26
LEAF_XSTATE = 0x0D

# XCR0 bits (Intel SDM vol. 1, 13.1).  Linux enables every user feature it knows that the CPU enumerates;
# KVM_SET_XCRS refuses partial groups (YMM without SSE, part of AVX-512 or of AMX).
XFEATURE_FP = 1 << 0
XFEATURE_SSE = 1 << 1
XFEATURE_YMM = 1 << 2
XFEATURE_AVX512 = 0b111 << 5  # opmask, ZMM_Hi256, Hi16_ZMM
XFEATURE_PKRU = 1 << 9
# Left out on purpose: MPX (bits 3-4, dropped by Linux 5.6+, and APX reuses its space), AMX tiles
# (17-18: dynamic, Linux only enables them with XFD) and APX (19).  The guest may still set them itself.
XCR0_LINUX_USER = XFEATURE_FP | XFEATURE_SSE | XFEATURE_YMM | XFEATURE_AVX512 | XFEATURE_PKRU


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


def guest_xcr0(entries: Iterable[abi.kvm_cpuid_entry2]) -> int:
    """The XCR0 a vCPU starts with: the user features Linux will enable, as far as CPUID 0xD.0 offers them.

    Architecturally XCR0 resets to 1 (x87 only) and the guest raises it with XSETBV.  KVM intercepts XSETBV
    and recomputes CPUID 0xD.0 EBX, the XSAVE size for the features enabled in XCR0.  Under the nested
    runner that intercept never reaches KVM: QEMU 7.2's TCG does not check the SVM XSETBV intercept, so the
    L2 guest's XSETBV changes the emulated CPU's XCR0 directly and L1's KVM keeps XCR0 = 1 (measured with
    KVM_GET_XCRS after a boot: 0x1 on both vCPUs).  The guest then reads EBX = 576 while its own sum for
    x87+SSE+AVX is 832, warns "XSAVE consistency problem", and disables XSAVE; 6.1 and 6.12 survive that,
    7.3 oopses in fpstate_reset.  Starting from the XCR0 Linux is about to set makes KVM's EBX right from
    the start, and the real XCR0 equals KVM's, so KVM never swaps a stale value in on VM entry.  Where
    XSETBV is intercepted (native KVM) this changes nothing: Linux writes the same value.

    Returns 1 (x87 only) when the CPUID has no XSAVE.
    """
    by_leaf = {(e.function, e.index): e for e in entries}
    leaf1 = by_leaf.get((1, 0))
    xstate = by_leaf.get((LEAF_XSTATE, 0))
    if leaf1 is None or xstate is None or not leaf1.ecx & CPUID_1_ECX_XSAVE:
        return XFEATURE_FP
    offered = (xstate.edx << 32 | xstate.eax) & XCR0_LINUX_USER
    if (offered & XFEATURE_AVX512) != XFEATURE_AVX512 or not offered & XFEATURE_YMM:
        offered &= ~XFEATURE_AVX512
    if not offered & XFEATURE_SSE:
        offered &= ~XFEATURE_YMM
    return offered | XFEATURE_FP


def entry(function: int, eax: int = 0, ebx: int = 0, ecx: int = 0, edx: int = 0,
          index: int = 0) -> abi.kvm_cpuid_entry2:
    return abi.kvm_cpuid_entry2(function=function, index=index, eax=eax, ebx=ebx, ecx=ecx, edx=edx)

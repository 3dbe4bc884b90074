"""The guest CPUID and starting XCR0 (hvlab/vmm/cpuid.py), from CPUID tables like KVM's, without KVM."""

from __future__ import annotations

import pytest

from hvlab.vmm import cpuid as G
from hvlab.vmm.cpuid import entry

# What L1's KVM (QEMU "EPYC" CPU) reported in the nested runner: XSAVE and AVX, XCR0 features x87|SSE|AVX.
EPYC_LEAF1_ECX = 0x76F83203


def table(leaf1_ecx: int = EPYC_LEAF1_ECX, xstate_eax: int = 0x7, xstate_edx: int = 0) -> list:
    return [
        entry(0, 0x10, 0x68747541, 0x444D4163, 0x69746E65),
        entry(1, 0x800F12, 0x800, leaf1_ecx, 0x178BFBFF),
        entry(0x0B, 0, 1, 0x100, 0),
        entry(G.LEAF_XSTATE, xstate_eax, 0x240, 0x340, xstate_edx, index=0),
        entry(G.LEAF_XSTATE, 0x5, index=1),
        entry(G.LEAF_XSTATE, 0x100, 0x240, index=2),
        entry(0x40000000, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),  # KVM's own signature
        entry(0x40000001, 0x01007AFB),
    ]


def test_xcr0_is_what_linux_enables_on_the_nested_epyc() -> None:
    assert G.guest_xcr0(table()) == 0x7


def test_xcr0_is_x87_only_without_xsave() -> None:
    assert G.guest_xcr0(table(leaf1_ecx=EPYC_LEAF1_ECX & ~G.CPUID_1_ECX_XSAVE)) == 0x1
    assert G.guest_xcr0([e for e in table() if e.function != G.LEAF_XSTATE]) == 0x1


@pytest.mark.parametrize("offered,expected", [
    (0x3, 0x3),        # x87|SSE
    (0xE7, 0xE7),      # AVX-512 complete
    (0x67, 0x7),       # AVX-512 incomplete: KVM_SET_XCRS would refuse it, so none of it
    (0x2E7, 0x2E7),    # + PKRU
    (0x1F, 0x7),       # MPX left out
    (0x60007, 0x7),    # AMX tiles are dynamic (XFD): Linux does not put them in XCR0 at boot
    (0x5, 0x1),        # AVX without SSE is not a valid XCR0
])
def test_xcr0_keeps_only_whole_feature_groups_linux_enables(offered: int, expected: int) -> None:
    assert G.guest_xcr0(table(xstate_eax=offered)) == expected


def test_xcr0_reads_the_high_half_from_edx() -> None:
    # nothing Linux enables at boot lives above bit 31 today; EDX must not leak into the low bits
    assert G.guest_xcr0(table(xstate_edx=0x7)) == 0x7


def test_guest_cpuid_hides_kvm_and_numbers_the_cpu() -> None:
    extra = [entry(0x40000000, 0x40000006, 1, 2, 3)]
    out = G.guest_cpuid(table(), 1, extra)
    leaves = {(e.function, e.index): e for e in out}
    assert leaves[(0x40000000, 0)].eax == 0x40000006  # only the Hyper-V leaf from extra
    assert (0x40000001, 0) not in leaves
    assert leaves[(1, 0)].ecx & G.CPUID_1_ECX_HYPERVISOR
    assert leaves[(1, 0)].ebx >> 24 == 1
    assert leaves[(0x0B, 0)].edx == 1
    # the input table is not modified
    assert not table()[1].ecx & G.CPUID_1_ECX_HYPERVISOR

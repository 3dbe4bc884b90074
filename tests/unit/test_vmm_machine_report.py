"""The pieces of the vCPU hang report that need no VM (the report itself is exercised by e2e test_boot)."""

from hvlab.vmm.machine import _vectors


def test_vectors_decodes_apic_bit_registers() -> None:
    page = bytearray(1024)
    # IRR at 0x200: vector 0x31 is word 1 bit 17, vector 0xef is word 7 bit 15; words are 16 bytes apart
    page[0x200 + 16 * 1 + 2] |= 1 << 1
    page[0x200 + 16 * 7 + 1] |= 1 << 7
    assert _vectors(bytes(page), 0x200) == "[0x31,0xef]"
    assert _vectors(bytes(page), 0x100) == "[]"

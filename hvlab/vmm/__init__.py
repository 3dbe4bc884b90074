"""hvlab.vmm: the KVM-independent building blocks of booting Linux in the hvlab VMM.

* :mod:`hvlab.vmm.layout` - the guest-physical memory map and fixed I/O ports, declared once.
* :mod:`hvlab.vmm.bootparams` - bzImage parsing, the zero page, page tables, GDT, 64-bit entry state.
* :mod:`hvlab.vmm.acpi` / :mod:`hvlab.vmm.aml` - RSDP/XSDT/FADT/FACS/MADT/DSDT with the VMBus device.
* :mod:`hvlab.vmm.devices` - port-I/O device models (16550A UART, CMOS/RTC, ACPI PM, reset port).

The KVM layer (hvlab.kvm) applies what these produce; nothing here opens /dev/kvm.
"""

"""The emulated Hyper-V platform: CPUID identity, synthetic MSRs, hypercalls and the SynIC.

It lives in the VMM (it injects interrupts and reads vCPU registers); VMBus and the devices sit above it
and never see KVM.  See spec/HOST_CONTRACT.md sections 0 and 1.
"""

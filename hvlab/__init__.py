"""hvlab: the host side of Hyper-V, emulated in Python on KVM, for testing Linux's Hyper-V guest drivers."""

__version__ = "0.1.0"

"""QEMU interop: a QEMU >= 10.1 root, a runner that boots hvlab guests with vfio-user devices, QMP."""

"""VF NIC models served over vfio-user (the SR-IOV virtual functions netvsc pairs with).

``hvlab.vf.vmxnet3.Vmxnet3`` is the model; ``hvlab.vf.testing`` a minimal guest-side driver for tests and
benchmarks; ``hvlab.vf.cli`` the ``hvlab vf serve`` command.
"""

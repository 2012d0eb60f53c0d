"""Triton kernels of fastppo, installed as `fastppo.kernels`, one op per module.

`fastppo.ops` looks an op up here by name (e.g. `fastppo.kernels.gae`); an op with no
kernel yet runs on the reference. Importing this package must not need a GPU.
"""

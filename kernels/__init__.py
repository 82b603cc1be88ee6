"""Triton kernels, one file per op; installed as fastvq.kernels. Import triton lazily through these."""

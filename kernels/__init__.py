"""Triton kernels and their launchers, installed as fusedopt.kernels (one module per kernel family).

Importing this package needs nothing but torch; a kernel module needs triton."""

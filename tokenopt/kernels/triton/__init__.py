"""Triton kernels and their launchers, one module per family (imported only when a kernel runs).

Each launcher has the signature and result of a reference chain in :mod:`tokenopt.kernels.reference`
and is tested against it under ``TRITON_INTERPRET=1`` on the CPU (``tests/kernels/test_triton_*.py``).
"""

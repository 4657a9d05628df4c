"""The machine the models run on: CI-DL streaming within a memory budget (``streaming``), time and memory
measurement and the CPU allocator policy (``memory``), the CPU BLAS (``blas``), device profiles (``profiles``).
"""

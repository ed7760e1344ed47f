"""VTA, the Versatile Tensor Accelerator: configuration, ISA, simulator, runtime and drivers.

TVM removed VTA in 2024; this package is the project's own stack. Importing it does nothing but
define names: no hardware access, no file reads.
"""

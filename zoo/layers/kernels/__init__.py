"""Backends of the zoo.layers operators and the one table that picks them (`dispatch`, re-exported here).

Every fused kernel here has a plain-PyTorch reference twin in zoo.layers. Importing this package imports no
kernel (nor triton): the operators import a backend's module only when the table picks it. Kernel modules import
only leaves (zoo.layers.window_geometry, `triton_common`), never the operators.
"""
from .dispatch import (
    GPU_VERIFIED, KERNEL_DTYPES, OPERATORS, REFERENCE, Backend, Call, Operator, backend_choices, gpu_kernels,
    natten_available, reference_only, resolve, select, triton_available,
)

__all__ = [
    'GPU_VERIFIED', 'KERNEL_DTYPES', 'OPERATORS', 'REFERENCE', 'Backend', 'Call', 'Operator', 'backend_choices',
    'gpu_kernels', 'natten_available', 'reference_only', 'resolve', 'select', 'triton_available',
]

"""Fast execution paths of the PMA optimizers.

:mod:`.cpu` holds a fused single-pass C++/SIMD kernel for CPU tensors (plain CPU training and
ZeRO-Offload, where DeepSpeed runs the step on CPU), the default for CPU tensors. It reads every element
once and writes it once, and agrees with the foreach path of :mod:`pma_dist.functional` bit for bit
(Lion-PMA; AdamW-PMA where torch's sqrt is correctly rounded) or within a derived bound (AdamW-PMA
parameters otherwise). See ``docs/performance.md``.
"""
from .build import FusedKernelUnavailable, load_cpu_kernels, unavailable_reason
from .cpu import adamw_pma_fused, fused_unsupported_reason, lion_pma_fused, may_fuse

__all__ = ["FusedKernelUnavailable", "adamw_pma_fused", "fused_unsupported_reason", "lion_pma_fused",
           "load_cpu_kernels", "may_fuse", "unavailable_reason"]

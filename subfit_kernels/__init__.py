"""Triton kernels for subfit's decode runtime, each beside a plain PyTorch reference of the same math.

Every op runs its Triton kernel on CUDA tensors (and on CPU under TRITON_INTERPRET=1) and its
reference otherwise; pass backend="reference" or "triton" to force one (see `_common.use_triton`).
The kernels are torch.library custom ops ("subfit::*"), so torch.compile and CUDA graphs see them
as opaque calls.
"""
from .add_rms_norm import add_rms_norm, add_rms_norm_reference
from .bypass import fused_bypass, fused_bypass_reference
from .decode_attention import decode_attention, decode_attention_reference
from .rope import apply_rope, apply_rope_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "add_rms_norm",
    "add_rms_norm_reference",
    "apply_rope",
    "apply_rope_reference",
    "decode_attention",
    "decode_attention_reference",
    "fused_bypass",
    "fused_bypass_reference",
    "swiglu",
    "swiglu_reference",
]

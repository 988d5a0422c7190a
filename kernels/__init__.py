"""Optional Triton kernels for minigpt2 (pip install 'minigpt2[kernels]').

`minigpt2` imports this package only when attn_impl is "triton" or "auto", so the model never requires triton.
To run the kernels on a CPU through Triton's interpreter (slow; for tests), set TRITON_INTERPRET=1 before the
first `import kernels`.
"""

from __future__ import annotations

import torch

try:
    from .flash_attention import INTERPRET as _INTERPRET
    from .flash_attention import flash_attention
except ImportError as _error:  # triton is missing: keep is_available() answering, fail clearly on use
    _INTERPRET = False
    _IMPORT_ERROR: ImportError | None = _error

    def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unavailable: triton could not be imported (see the chained error)."""
        raise ImportError(str(_IMPORT_ERROR)) from _IMPORT_ERROR
else:
    _IMPORT_ERROR = None


def is_available() -> bool:
    """True when flash_attention can run here: triton imports, and a CUDA GPU is present or the kernels were
    defined for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _IMPORT_ERROR is None and (_INTERPRET or torch.cuda.is_available())


def runs_on(device: torch.device) -> bool:
    """True when flash_attention can run on tensors of `device`: a CUDA GPU, or any device in the interpreter."""
    return is_available() and (device.type == "cuda" or _INTERPRET)


__all__ = ["flash_attention", "is_available", "runs_on"]

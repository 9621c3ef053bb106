"""LayerNorm / RMSNorm modules: drop-in for torch.nn.LayerNorm / torch.nn.RMSNorm (same arguments, same
parameters and state-dict keys), running fastllm's fused ops. `forward(x)` returns a tensor, as torch's;
`add_forward(x, residual)` returns (norm(x + residual), x + residual) from one fused kernel, for pre-norm blocks.
"""

import math
import numbers

import torch
from torch import nn

from fastllm.ops.layer_norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm


def _shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(s) for s in normalized_shape)


class _Norm(nn.Module):
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """Normalizing over the last k dims = normalizing the flattened last dim."""
        k = len(self.normalized_shape)
        if k == 1:
            return x
        if tuple(x.shape[-k:]) != self.normalized_shape:
            raise ValueError(
                f"{type(self).__name__}: input's last dims {tuple(x.shape[-k:])} != normalized_shape "
                f"{self.normalized_shape}"
            )
        return x.reshape(*x.shape[:-k], math.prod(self.normalized_shape))

    def _param(self, p):
        return p.reshape(-1) if p is not None else None

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class LayerNorm(_Norm):
    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):  # fmt: skip
        super().__init__()
        self.normalized_shape = _shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        kw = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **kw))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **kw)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._param(self.weight), self._param(self.bias)
        return layer_norm(self._flat(x), w, b, self.eps).view(x.shape)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), one pass."""
        w, b = self._param(self.weight), self._param(self.bias)
        out, h = add_layer_norm(self._flat(x), self._flat(residual), w, b, self.eps)
        return out.view(x.shape), h.view(x.shape)


class RMSNorm(_Norm):
    """eps=None uses torch.finfo(x.dtype).eps, as torch.nn.RMSNorm does."""

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None):  # fmt: skip
        super().__init__()
        self.normalized_shape = _shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def _eps(self, x: torch.Tensor) -> float:
        return self.eps if self.eps is not None else torch.finfo(x.dtype).eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(self._flat(x), self._param(self.weight), self._eps(x)).view(x.shape)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), one pass."""
        out, h = add_rms_norm(self._flat(x), self._flat(residual), self._param(self.weight), self._eps(x))
        return out.view(x.shape), h.view(x.shape)

"""Transformer MLP modules backed by fastllm's fused ops. Submodules are plain nn.Linear, so state dicts use
the usual keys: FusedFFN has fc1 / fc2 (GPT-2's c_fc / c_proj, BERT's intermediate / output dense, ViT and
CLIP's fc1 / fc2 map onto them), FusedGatedFFN has gate_proj / up_proj / down_proj (Llama's names).
"""

from torch import nn

from fastllm.ops.gemm import ACTIVATIONS, fused_ffn, fused_gated_ffn


def _check(name: str, activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: unknown activation {activation!r}; accepted: {', '.join(ACTIVATIONS)}")
    return activation


class FusedFFN(nn.Module):
    """act(x W1^T + b1) W2^T + b2 (GPT-2 / BERT / ViT / CLIP MLP); out_features defaults to in_features."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 activation: str = "gelu", bias: bool = True, device=None, dtype=None):  # fmt: skip
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.activation = _check("FusedFFN", activation)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **kw)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias, **kw)

    def forward(self, x):
        fc1, fc2 = self.fc1, self.fc2
        return fused_ffn(x, fc1.weight, fc2.weight, b1=fc1.bias, b2=fc2.bias, activation=self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class FusedGatedFFN(nn.Module):
    """(act(x Wg^T) * x Wu^T) Wd^T: Llama's SwiGLU MLP (activation="silu"), GeGLU with gelu / gelu_tanh."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", bias: bool = False,
                 device=None, dtype=None):  # fmt: skip
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.activation = _check("FusedGatedFFN", activation)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, **kw)

    def forward(self, x):
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        return fused_gated_ffn(
            x, g.weight, u.weight, d.weight, b_gate=g.bias, b_up=u.bias, b_down=d.bias, activation=self.activation
        )

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

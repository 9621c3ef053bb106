"""A static, preallocated KV cache for decoding (gpt-fast style): one (B, Hkv, S_max, D) buffer per layer for K and
one for V, and the number of tokens already written per sequence. Nothing is reallocated while generating."""

import torch


class KVCache:
    """k[i], v[i]: (B, Hkv, max_seq_len, D) for layer i; seqlens (B,) int32: tokens already in the cache per row.

    A model's forward with a cache writes row b's new tokens at positions seqlens[b] .. seqlens[b] + S - 1 and
    then advances seqlens by S. `row(b)` is a cache of row b alone sharing this one's storage (a ragged batch is
    prefilled row by row through it, so that padding never enters the cache)."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype=torch.float32, device=None):  # fmt: skip
        for name, v in (("num_layers", num_layers), ("batch_size", batch_size), ("num_kv_heads", num_kv_heads),
                        ("max_seq_len", max_seq_len), ("head_dim", head_dim)):  # fmt: skip
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {v!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"KVCache: dtype must be a floating torch.dtype (the model's), got {dtype!r}")
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len

    @classmethod
    def _view(cls, k, v, seqlens, max_seq_len):
        c = cls.__new__(cls)
        c.k, c.v, c.seqlens = k, v, seqlens
        c.batch_size, c.max_seq_len = seqlens.shape[0], max_seq_len
        return c

    def row(self, b: int) -> "KVCache":
        """The cache of row b alone (views: writes land in this cache)."""
        if not 0 <= b < self.batch_size:
            raise ValueError(f"KVCache.row: b must lie in [0, {self.batch_size}), got {b}")
        sl = slice(b, b + 1)
        return KVCache._view([k[sl] for k in self.k], [v[sl] for v in self.v], self.seqlens[sl], self.max_seq_len)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def reset(self) -> None:
        """Empty every row (the buffers are kept; stale K/V past seqlens are never attended)."""
        self.seqlens.zero_()

    def __repr__(self) -> str:
        k = self.k[0]
        return (
            f"KVCache(layers={len(self.k)}, shape={tuple(k.shape)}, dtype={k.dtype}, seqlens={self.seqlens.tolist()})"
        )

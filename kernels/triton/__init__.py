"""Triton GPU kernels of fastllm (installed as fastllm.kernels.triton; TRITON_INTERPRET=1 runs them on CPU)."""

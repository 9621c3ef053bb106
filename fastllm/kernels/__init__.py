"""Kernel sources shipped with fastllm: fastllm.kernels.triton is the repository's kernels/triton."""

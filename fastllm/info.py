"""`python -m fastllm info`: versions, CPU, the C++ extension, GPUs, Triton, and the backend each op would use."""

import importlib.metadata
import os
import platform

import torch

from fastllm import _ext, _op


def _probes() -> dict:
    """(op name -> a call that exercises it) for the backend table; run on small inputs under explain."""
    import fastllm

    return {
        "layer_norm": lambda x: fastllm.layer_norm(x),
        "add_layer_norm": lambda x: fastllm.add_layer_norm(x, x),
        "rms_norm": lambda x: fastllm.rms_norm(x),
        "add_rms_norm": lambda x: fastllm.add_rms_norm(x, x),
        "flash_attention": lambda x: fastllm.flash_attention(*(x.view(1, 1, *x.shape),) * 3),
        "decode_attention": lambda x: fastllm.decode_attention(
            x.view(1, 1, *x.shape)[:, :, :1],
            *(x.view(1, 1, *x.shape),) * 2,
            torch.tensor([x.shape[0]], dtype=torch.int32, device=x.device),
        ),
        "linear": lambda x: fastllm.linear(x, x, activation="gelu"),
        "fused_ffn": lambda x: fastllm.fused_ffn(x, x, x.t()),
        "fused_gated_ffn": lambda x: fastllm.fused_gated_ffn(x, x, x, x.t()),
        "quantize_int8": lambda x: fastllm.quantize_int8(x),
        "int8_matmul": lambda x: fastllm.int8_matmul(
            *(fastllm.quantize_int8(x)[0],) * 2, *(torch.ones(x.shape[0]),) * 2
        ),
        "w8a16_linear": lambda x: fastllm.w8a16_linear(x, fastllm.quantize_int8(x)[0], torch.ones(x.shape[0])),
    }


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> dict:
    if _ext.C is not None:
        return dict(_ext.C.cpu_features())
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    names = {"avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f", "avx512bw": "avx512bw",
             "avx512vl": "avx512vl", "avx512dq": "avx512dq", "avx512vnni": "avx512_vnni",
             "avx512bf16": "avx512_bf16"}  # fmt: skip
    return {k: v in flags for k, v in names.items()}


def backend_table() -> list[tuple[str, str, str, str]]:
    """(op, device, backend, reason) for float32 inputs on each available device."""
    import fastllm

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for name, probe in _probes().items():
        for device in devices:
            x = torch.randn(2, 8, device=device)
            with fastllm.explain() as log:
                probe(x)
            d = log[-1]  # the probed op is the last call (a probe may first build its inputs with another op)
            rows.append((name, device, d.backend, d.reason))
    return rows


def report() -> str:
    lines = [
        f"fastllm        {_version('fastllm')}",
        f"python         {platform.python_version()} ({platform.machine()}, {platform.system()})",
        f"torch          {torch.__version__} (threads: {torch.get_num_threads()})",
        f"triton         {_version('triton')}" + ("  [TRITON_INTERPRET=1]" if _op.triton_interpret() else ""),
        f"numpy          {_version('numpy')}",
        f"cpu            {cpu_model()} ({os.cpu_count()} logical cores)",
        "cpu features   " + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu_features().items()),
        f"fastllm._C     {_ext.STATUS}",
    ]
    if _ext.C is not None:
        lines.append(f"  ISA path     {_ext.C.isa()} (FASTLLM_ISA={'|'.join(_ext.ISA_CHOICES)} chooses)")
        levels = "; ".join(f"{name}: {'no (' + why + ')' if why else 'yes'}" for name, why in _ext.C.isa_levels())
        lines.append(f"  ISA levels   {levels}")
        dots = [f"vdpbf16ps (bf16 GEMMs): {'yes' if _ext.C.avx512bf16_available() else 'no'}",
                f"vpdpbusd (W8A8): {'yes' if _ext.C.avx512vnni_available() else 'no'}"]  # fmt: skip
        lines.append(f"  avx512_dot   {', '.join(dots)}")
        lines.append(
            f"  threads      fastllm's pool (kernels/cpp/parallel.h); calls use torch.get_num_threads(), one "
            f"thread below 32K elements per thread (OpenMP max threads {_ext.C.openmp_max_threads()}: the probes); "
            f"idle workers spin {_ext.SPIN_US} us (FASTLLM_SPIN_US)"
        )
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}          {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        lines.append("gpu            none (CUDA not available)")
    lines.append(f"backend        requested: {os.environ.get('FASTLLM_BACKEND', 'auto') or 'auto'}")
    lines.append("")
    lines.append(f"{'op':<18}{'device':<8}{'backend':<11}why")
    for name, device, backend, reason in backend_table():
        lines.append(f"{name:<18}{device:<8}{backend:<11}{reason}")
    return "\n".join(lines)

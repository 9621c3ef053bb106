"""What the benchmark runs on, read from the system and measured, never quoted: the CPU (or GPU) and its ISA
flags, the last-level cache, the copy and compute ceilings, and which oneDNN primitives a torch call ran.

Ceilings: memory bandwidth = the best large copy (torch copy_, and on CPU the multi-threaded memcpy and
non-temporal copy of fastllm._C), counting read + write bytes; compute = the best of an FMA loop (fastllm._C)
and a large fp32 GEMM (CPU) or a bf16 GEMM (CUDA); each the fastest of several calls. The harness measures them
before the first row and again after the last; a drift over NOISY_DRIFT between the two marks the table noisy.
"""

import contextlib
import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

import fastllm._ext

NOISY_DRIFT = 0.10  # ceilings that move more than this between the start and the end of a run: "NOISY"
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni")  # /proc/cpuinfo spellings


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- the machine


def _parse_size(text: str) -> int:
    """'32768K', '1M', '32 MiB' -> bytes."""
    m = re.match(r"\s*([\d.]+)\s*([KMG]?)", text.upper())
    if not m:
        raise ValueError(f"cache size {text!r}")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])


def _cpu_llc() -> tuple[int, str]:
    """(bytes, where it was read) of the CPU's last-level data/unified cache."""
    best = None  # (level, bytes)
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        with contextlib.suppress(OSError, ValueError):
            with open(f"{d}/type") as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(f"{d}/level") as f, open(f"{d}/size") as g:
                cand = (int(f.read()), _parse_size(g.read()))
            best = max(best or cand, cand)
    if best:
        return best[1], f"L{best[0]}, sysfs"
    for level in (3, 2):
        with contextlib.suppress(ValueError, OSError, AttributeError):
            size = os.sysconf(f"SC_LEVEL{level}_CACHE_SIZE")
            if size > 0:
                return size, f"L{level}, sysconf"
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for level in ("L3", "L2"):
            m = re.search(rf"^{level} cache:\s*(.+?)(\s*\(.*)?$", out, re.MULTILINE)
            if m:
                return _parse_size(m.group(1).replace("i", "")), f"{level}, lscpu"
    return 64 << 20, "unknown: assumed 64 MiB"


_LLC: dict = {}


def llc(device: str) -> tuple[int, str]:
    """(bytes, description) of the last-level cache the device's inputs must exceed."""
    if device not in _LLC:
        if device.startswith("cuda"):
            _LLC[device] = (torch.cuda.get_device_properties(0).L2_cache_size, "L2, CUDA properties")
        else:
            _LLC[device] = _cpu_llc()
    return _LLC[device]


def _cpu_model() -> tuple[str, set]:
    """(model name, flags) from /proc/cpuinfo; platform.processor() and no flags elsewhere."""
    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            info = f.read()
        m = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
        name = m.group(1).strip() if m else name
        m = re.search(r"^flags\s*:\s*(.+)$", info, re.MULTILINE)
        flags = set(m.group(1).split()) if m else set()
    return name, flags


def describe(device: str) -> str:
    """The device in words: CPU model name + ISA flags + fastllm's ISA path, or the GPU's name."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    name, flags = _cpu_model()
    has = [f for f in ISA_FLAGS if f in flags]
    lacks = [f for f in ISA_FLAGS if f not in flags]
    C = fastllm._ext.C
    isa = C.isa() if C is not None else f"none: {fastllm._ext.STATUS}"
    missing = f" (no {', '.join(lacks)})" if lacks else ""
    return f"{name}; flags {' '.join(has) or '-'}{missing}; fastllm isa {isa}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def kind(device: str) -> str:
    """A short name for result files: 'cpu-amd-epyc-avx2', 'cuda-nvidia-h100-80gb-hbm3'."""
    if device.startswith("cuda"):
        return "cuda-" + _slug(torch.cuda.get_device_name(0))
    model = re.sub(r"\((R|TM)\)|\bCPU\b|\bProcessor\b|@.*|\d+-Core", "", _cpu_model()[0])
    C = fastllm._ext.C
    return f"cpu-{_slug(model)}-{C.isa() if C is not None else 'nocpp'}"


# ---------------------------------------------------------------------------------------------- ceilings


def _best_time(fn, device: str, reps: int) -> float:
    """The fastest of `reps` calls: a ceiling is what the machine can do, and other load only slows a call down."""
    fn()
    sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return min(ts)


def measure_ceilings(device: str, quick: bool = False) -> dict:
    """{'copy_gbps', 'copy_how', 'peak_tflops', 'peak_how'} measured on this machine now."""
    reps = 5 if quick else 15
    nbytes = 256 << 20 if device == "cpu" else 1 << 30
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copies = {"torch copy_": _best_time(lambda: dst.copy_(src), device, reps)}
    C = fastllm._ext.C
    if device == "cpu" and C is not None:
        nt = fastllm._ext.num_threads()
        for how, stream in (("parallel memcpy", False), ("non-temporal copy", True)):
            copies[how] = _best_time(
                lambda s=stream: C.copy_bytes(dst.data_ptr(), src.data_ptr(), nbytes, nt, s), device, reps
            )
    copy_how = min(copies, key=copies.get)
    copy_gbps = 2 * nbytes / copies[copy_how] / 1e9

    peaks = {}
    if device == "cpu":
        a = torch.randn(2048, 2048)
        peaks["fp32 GEMM 2048^3 (torch)"] = 2 * 2048**3 / _best_time(lambda: a @ a, device, 3 if quick else 5) / 1e12
        nt = fastllm._ext.num_threads()
        if C is not None and C.avx2_available():
            iters = 20_000_000
            t = _best_time(lambda: C.fma_loop(iters, nt, True), device, 3)
            peaks["AVX2 FMA loop"] = C.fma_loop(1, nt, True) * iters * nt / t / 1e12
        if C is not None and C.avx512_available():
            iters = 10_000_000
            t = _best_time(lambda: C.fma_loop_avx512(iters, nt), device, 3)
            peaks["AVX-512 FMA loop"] = C.fma_loop_avx512(1, nt) * iters * nt / t / 1e12
    else:
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        peaks["bf16 GEMM 8192^3 (cuBLAS)"] = 2 * 8192**3 / _best_time(lambda: a @ a, device, 10) / 1e12
    peak_how = max(peaks, key=peaks.get)
    return {"copy_gbps": copy_gbps, "copy_how": copy_how, "peak_tflops": peaks[peak_how], "peak_how": peak_how}


def drift(before: dict, after: dict) -> float:
    """The larger relative change of the two ceilings between two measurements."""
    return max(abs(after[k] / before[k] - 1) for k in ("copy_gbps", "peak_tflops"))


# ---------------------------------------------------------------------------------------------- oneDNN


@contextlib.contextmanager
def onednn_primitives():
    """Collect the oneDNN primitives executed inside the block, as 'kind impl' strings ('matmul brg:avx512_core_bf16').

    oneDNN's verbose mode prints one line per executed primitive to the C-level stdout; fd 1 goes to a temporary
    file for the block. Yields a list that is filled when the block ends.
    """
    found: list[str] = []
    if not torch.backends.mkldnn.is_available():
        yield found
        return
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                yield found
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        for line in f.read().decode(errors="replace").splitlines():
            # onednn_verbose,v1,primitive,exec,cpu,<kind>,<impl>,...
            parts = line.split(",")
            if len(parts) > 6 and parts[0] == "onednn_verbose" and "exec" in parts[2:4]:
                i = parts.index("exec")
                name = f"{parts[i + 2]} {parts[i + 3]}"
                if name not in found and parts[i + 2] != "reorder":  # layout changes around the real work
                    found.append(name)

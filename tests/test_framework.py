"""The op framework: backend selection, explain/debug logging, the extension fallback, the info CLI."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import fastllm
import fastllm._ext


def run_py(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_backend_context_and_env(monkeypatch):
    x = torch.randn(3, 16)
    monkeypatch.setenv("FASTLLM_BACKEND", "reference")
    with fastllm.explain() as log:
        fastllm.rms_norm(x)
        with fastllm.backend("cpp"):  # the context manager wins over the environment
            fastllm.rms_norm(x)
        monkeypatch.setenv("FASTLLM_BACKEND", "auto")
        fastllm.rms_norm(x)
    cpp = "cpp" if fastllm._ext.C is not None else "reference"
    assert [d.backend for d in log] == ["reference", cpp, cpp]
    assert "requested" in log[0].reason


def test_unknown_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="expected one of auto, triton, cpp, reference"), fastllm.backend("cuda"):
        pass
    monkeypatch.setenv("FASTLLM_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTLLM_BACKEND"):
        fastllm.layer_norm(torch.randn(2, 4))


def test_forced_backend_that_cannot_run_falls_back_with_reason():
    x = torch.randn(2, 8, dtype=torch.float64)
    with fastllm.backend("triton"), fastllm.explain() as log:
        out = fastllm.layer_norm(x)
    assert log[0].backend == "reference" and log[0].reason.startswith("triton:")
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (8,)))


def test_debug_logging_names_the_path():
    r = run_py("import torch, fastllm; fastllm.add_rms_norm(torch.randn(2, 8), torch.randn(2, 8))", FASTLLM_DEBUG="1")
    assert r.returncode == 0, r.stderr
    assert "[fastllm] add_rms_norm[2, 8] float32 on cpu:" in r.stderr


def test_no_cpp_imports_warns_once_and_uses_reference():
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastllm, fastllm.nn\n"
        "    with fastllm.explain() as log:\n"
        "        fastllm.layer_norm(torch.randn(2, 8)); fastllm.rms_norm(torch.randn(2, 8))\n"
        "print(sum('C++ extension not available' in str(x.message) for x in w), log[0].backend, log[1].backend)\n"
    )
    r = run_py(code, FASTLLM_NO_CPP="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "reference", "reference"]


def test_info_cli():
    r = subprocess.run([sys.executable, "-m", "fastllm", "info"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for needle in ("fastllm", "torch", "triton", "cpu features", "fastllm._C", "add_rms_norm"):
        assert needle in r.stdout
    if fastllm._ext.C is not None:
        assert f"ISA path     {fastllm._ext.C.isa()}" in r.stdout
        for name, why_not in fastllm._ext.C.isa_levels():  # every level, with the reason where it cannot run
            assert (f"{name}: no ({why_not})" if why_not else f"{name}: yes") in r.stdout, r.stdout


_LEVELS = "auto|scalar|avx2|avx512|avx512_dot"


@pytest.mark.parametrize(
    "var,value,accepted",
    [("FASTLLM_ISA", "avx9000", _LEVELS), ("FASTLLM_ISA", "AVX2", _LEVELS), ("FASTLLM_NO_CPP", "yes", "0|1")],
)
def test_bad_environment_values_raise(var, value, accepted):
    r = run_py("import fastllm", **{var: value})
    assert r.returncode != 0
    assert f"ValueError: {var}={value!r} is not valid; accepted values: {accepted}" in r.stderr, r.stderr


@pytest.mark.parametrize("value", ["-5", "1e3", "2000000", "fast", " 10"])
def test_bad_spin_value_raises(value):
    r = run_py("import fastllm", FASTLLM_SPIN_US=value)
    assert r.returncode != 0
    assert f"ValueError: FASTLLM_SPIN_US={value!r} is not valid" in r.stderr, r.stderr


def test_spin_values_run():
    """0 (sleep at once) and a long spin: the pool's results do not depend on it (a 2-thread GEMM, both values)."""
    code = ("import torch, fastllm; torch.manual_seed(0); x = torch.randn(64, 96); w = torch.randn(128, 96); "
            "print(fastllm._ext.SPIN_US, fastllm.linear(x, w).sum().item())")  # fmt: skip
    outs = [run_py(code, FASTLLM_SPIN_US=v) for v in ("0", "250000")]
    assert all(r.returncode == 0 for r in outs), [r.stderr for r in outs]
    (s0, y0), (s1, y1) = (r.stdout.split() for r in outs)
    assert (s0, s1) == ("0", "250000") and y0 == y1


def test_bad_no_cpp_value_fails_the_build():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "FASTLLM_NO_CPP": "true"})  # fmt: skip
    assert r.returncode != 0
    assert "FASTLLM_NO_CPP='true' is not valid; accepted values: 0|1" in r.stderr, r.stderr


def test_isa_level_the_cpu_cannot_run_raises():
    C = fastllm._ext.C
    if C is None:
        pytest.skip(f"C++ extension not loaded ({fastllm._ext.STATUS})")
    missing = [(name, why_not) for name, why_not in C.isa_levels() if why_not]
    if not missing:
        pytest.skip("this CPU and build run every ISA level")
    name, why_not = missing[0]
    r = run_py("import fastllm", FASTLLM_ISA=name)
    assert r.returncode != 0
    assert f"ValueError: FASTLLM_ISA={name!r}" in r.stderr and why_not in r.stderr, r.stderr
    with pytest.raises(ValueError, match=why_not):
        C.set_isa(name)


def test_isa_env_sets_the_level():
    r = run_py("import fastllm._ext as e; print(e.C.isa() if e.C is not None else None)", FASTLLM_ISA="scalar")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["scalar" if fastllm._ext.C is not None else "None"]


def test_extension_enum_tables_hold_the_names_python_passes():
    """Python passes enum codes by name (fastllm._ext.code); these are the names it uses."""
    from fastllm.ops import gemm

    C = fastllm._ext.C
    if C is None:
        pytest.skip(f"C++ extension not loaded ({fastllm._ext.STATUS})")
    assert set(C.ACTIVATIONS) == {"none", *gemm.ACTIVATIONS}
    assert set(C.EPILOGUES) == {"plain", "gated", "dact", "dgated", "int8", "scale"}
    assert set(C.LAYOUTS) == {"rows", "pairs", "i8_rows", "i16_pairs", "i8_quads"}
    assert set(C.DTYPES) == {"float32", "bfloat16", "float16", "int8"}
    assert set(fastllm._ext.DTYPE_CODES) == {torch.float32, torch.bfloat16, torch.float16, torch.int8}
    assert [name for name, _ in C.isa_levels()] == list(fastllm._ext.ISA_CHOICES[1:])


def test_no_torch_headers_in_cpp():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "kernels" / "cpp"
    sources = list(root.glob("*.cpp")) + list(root.glob("*.h"))
    assert sources
    for f in sources:
        assert "#include <torch" not in f.read_text(), f
        assert "#include <ATen" not in f.read_text(), f


def test_forced_backend_that_cannot_run_warns_once():
    """`with fastllm.backend("triton")` on CPU tensors without the interpreter runs the reference and says so."""
    code = textwrap.dedent("""
        import warnings, torch, fastllm
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as w, fastllm.backend("triton"), fastllm.explain() as log:
            for _ in range(3):
                fastllm.layer_norm(torch.randn(2, 8))
        msgs = [str(x.message) for x in w if "was requested" in str(x.message)]
        assert len(msgs) == 1 and "TRITON_INTERPRET" in msgs[0], msgs
        assert {d.backend for d in log} == {"reference"}
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_backend_override_is_per_thread_and_reaches_the_backward():
    seen = {}

    def worker():
        seen["thread"] = fastllm.get_backend()

    with fastllm.backend("reference"):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        x = torch.randn(3, 16, requires_grad=True)
        y = fastllm.layer_norm(x)
    assert seen["thread"] == fastllm.get_backend() == "auto"
    with fastllm.explain() as log:
        y.sum().backward()  # outside the block: the backward still runs on the backend of the forward
    assert log and {d.backend for d in log} == {"reference"}, [str(d) for d in log]


def test_bad_backend_env_raises_naming_the_variable():
    for var, value in (("FASTLLM_BACKEND", "cuda"), ("FASTLLM_DEBUG", "yes")):
        env = {**os.environ, var: value}
        r = subprocess.run([sys.executable, "-c", "import fastllm"], capture_output=True, text=True, env=env,
                           timeout=120)  # fmt: skip
        assert r.returncode != 0 and var in r.stderr, (var, r.stderr[-500:])

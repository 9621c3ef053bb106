"""Build driver: setuptools packages the Python code, CMake (+ ninja) builds the extension fastllm._C.

The C++ includes no torch headers, so the build needs no torch and the binary works with any torch.
FASTLLM_NO_CPP=1 skips the extension (fastllm then runs CPU ops on the reference path); 0 or unset builds it.
CMAKE_ARGS (space-separated) are passed through to cmake.
FASTLLM_SANITIZE=address,undefined (any -fsanitize= list) builds the extension with those sanitizers (-O1 -g, UBSan
findings abort); run its tests with scripts/sanitize.sh, which builds into a folder of its own and preloads the runtime.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            "-G",
            "Ninja",
        ]
        if os.environ.get("FASTLLM_SANITIZE"):
            args.append(f"-DFASTLLM_SANITIZE={os.environ['FASTLLM_SANITIZE']}")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg], cwd=build_dir, check=True)


# FASTLLM_NO_CPP: 0 or 1 (unset or empty: 0), checked as fastllm/_ext.py checks it at import
_no_cpp = os.environ.get("FASTLLM_NO_CPP", "") or "0"
if _no_cpp not in ("0", "1"):
    raise ValueError(f"FASTLLM_NO_CPP={_no_cpp!r} is not valid; accepted values: 0|1 (1 skips the C++ extension)")
no_cpp = _no_cpp == "1"

setup(
    # every fastllm.* package (models, nn, ops, integrations, ...) and the Triton kernels from kernels/triton
    packages=[*find_packages(include=["fastllm", "fastllm.*"]), "fastllm.kernels.triton"],
    package_dir={"fastllm": "fastllm", "fastllm.kernels.triton": "kernels/triton"},
    ext_modules=[] if no_cpp else [CMakeExtension("fastllm._C")],
    cmdclass={"build_ext": CMakeBuild},
)

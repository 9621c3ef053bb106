"""pytest-benchmark drives the suites; the harness collects rows and prints one table at the end.

pytest benchmarks                       # all suites on the local device(s)
pytest benchmarks --no-compile          # skip the torch.compile rows (they compile for ~7 s each on CPU)
pytest benchmarks --bench-json out.json # also write the rows as JSON (default benchmarks/results/latest.json)
"""

import os
import platform
from pathlib import Path

import harness as harness_mod
import pytest
import torch

_HARNESS = harness_mod.Harness()


def pytest_configure(config):
    # pytest-benchmark's own table: keep it to the columns we use (the harness prints the full table)
    if hasattr(config.option, "benchmark_columns"):
        config.option.benchmark_columns = ["median", "iqr", "rounds"]


def pytest_addoption(parser):
    parser.addoption("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.addoption("--bench-json", default=str(Path(__file__).parent / "results" / "latest.json"))


@pytest.fixture(scope="session")
def harness():
    return _HARNESS


@pytest.fixture(scope="session")
def use_compile(request):
    return not request.config.getoption("--no-compile")


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _HARNESS.rows:
        return
    tr = terminalreporter
    tr.section("fastllm benchmark: speed and equivalence (medians; speedup vs eager in the same run)")
    tr.write_line(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
                  f"FASTLLM_BACKEND={os.environ.get('FASTLLM_BACKEND', 'auto')}")  # fmt: skip
    tr.write_line(_HARNESS.table())
    path = Path(config.getoption("--bench-json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_HARNESS.to_json())
    tr.write_line(f"rows written to {path}")

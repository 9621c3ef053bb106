"""pytest-benchmark drives the suites; the harness collects rows and prints one table at the end.

pytest benchmarks                       # all suites on the local device(s)
pytest benchmarks --bench-quick         # a small subset of every suite (a few minutes on 2 cores)
pytest benchmarks --no-compile          # skip the torch.compile rows (they compile for ~7 s each on CPU)
pytest benchmarks --bench-json out.json # also write the rows as JSON (default benchmarks/results/latest.json)
pytest benchmarks --bench-save          # write benchmarks/results/<kind>-<suites>-<date>.{json,md}

Regenerate the committed tables (one JSON + markdown pair per suite, named by CPU kind and date, e.g.
benchmarks/results/cpu-amd-epyc-avx2-gemm-2026-11-24.md), on a quiet machine, from the repository root:

    for s in attention gemm int8 layer_norm; do .venv/bin/python -m pytest benchmarks/bench_$s.py --bench-save; done

A table whose header says NOISY had its ceilings move more than 10% between the start and the end of the run: run
it again when the machine is quiet.
"""

import datetime
import logging
from pathlib import Path

import harness as harness_mod
import machine
import pytest
import torch

from fastllm.testing import import_torchvision

import_torchvision()  # (before transformers is imported: fastllm.testing.import_torchvision says why)

RESULTS = Path(__file__).parent / "results"
_HARNESS = harness_mod.Harness()


def pytest_addoption(parser):
    parser.addoption("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.addoption("--bench-quick", action="store_true", help="run only a small subset of cases per suite")
    parser.addoption("--bench-json", default=str(RESULTS / "latest.json"), help="where to write the rows as JSON")
    parser.addoption("--bench-save", action="store_true",
                     help="also write benchmarks/results/<kind>-<suites>-<date>.json and .md")  # fmt: skip


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: part of the --bench-quick subset")
    _HARNESS.quick = config.getoption("--bench-quick")
    # torch.compile's structured-trace records are DEBUG records on this logger; pytest would print thousands of
    # them under a failed case that has a compile row
    logging.getLogger("torch.__trace").propagate = False
    # pytest-benchmark's own table: keep it to the columns we use (the harness prints the full table)
    if hasattr(config.option, "benchmark_columns"):
        config.option.benchmark_columns = ["median", "iqr", "rounds"]


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--bench-quick"):
        return
    here = Path(__file__).parent
    keep, drop = [], []
    for item in items:
        in_suite = here in Path(item.path).parents
        (drop if in_suite and item.get_closest_marker("quick") is None else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def harness():
    return _HARNESS


@pytest.fixture(scope="session")
def use_compile(request):
    return not request.config.getoption("--no-compile")


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def cases(params, ids, quick) -> list:
    """pytest.param per case tuple, with id ids(p), marked `quick` where quick(p) (the --bench-quick subset)."""
    return [pytest.param(p, id=ids(p), marks=[pytest.mark.quick] if quick(p) else []) for p in params]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _HARNESS.rows:
        return
    _HARNESS.remeasure()  # the ceilings again, after the last row
    tr = terminalreporter
    tr.section("fastllm benchmark: speed and equivalence (medians of interleaved rounds; speedup vs eager)")
    tr.write_line(_HARNESS.table())
    paths = [Path(config.getoption("--bench-json"))]
    if config.getoption("--bench-save"):
        suites = "+".join(dict.fromkeys(r.suite for r in _HARNESS.rows))
        kinds = "+".join(dict.fromkeys(machine.kind(r.device) for r in _HARNESS.rows))
        stem = RESULTS / f"{kinds}-{suites}-{datetime.date.today().isoformat()}"
        paths.append(stem.with_suffix(".json"))
        stem.with_suffix(".md").write_text(_HARNESS.table(markdown=True) + "\n")
        tr.write_line(f"table written to {stem.with_suffix('.md')}")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_HARNESS.to_json())
        tr.write_line(f"rows written to {path}")

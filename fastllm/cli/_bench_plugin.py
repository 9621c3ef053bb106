"""pytest plugin of `python -m fastllm bench` (loaded with -p in the child pytest; not for direct use).

Reads FASTLLM_BENCH_SELECT ({"device", "dtype", "regex"}) and deselects the cases that do not match; appends one
JSON line per event to FASTLLM_BENCH_EVENTS ({"total": n} after collection, {"done": nodeid, "outcome": ...} per
finished case) for the parent's progress bar; writes the harness's table to FASTLLM_BENCH_TABLE at the end.
"""

import json
import os
import re

import pytest

from fastllm.cli.bench import DEVICES, DTYPES

_TOKENS = re.compile(r"[-\[\]]")


def selected(nodeid: str, device: str | None, dtype: str | None, regex: str | None) -> bool:
    """Whether the case with this pytest node id is kept (see fastllm.cli.bench: Selection)."""
    tokens = set(_TOKENS.split(nodeid.split("::")[-1]))
    if device is not None and device not in (tokens & set(DEVICES) or {"cpu"}):
        return False
    if dtype is not None and (tokens & set(DTYPES)) - {dtype}:
        return False
    return regex is None or re.search(regex, nodeid) is not None


def _emit(ev: dict) -> None:
    path = os.environ.get("FASTLLM_BENCH_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(ev) + "\n")


# CPU cases that build a 135M-parameter Llama (HF generate, float64 references) or accelerate whole models: 50-130 s
# each on 2 busy cores, so not in `bench --quick` (`bench models` runs them); the MiniLM encoder row stays (the one
# model row of the quick table). Prefixes of function names (bench_accelerate_llama too).
QUICK_SKIP = ("bench_llama", "bench_accelerate")


def quick_subset(nodeids: list[str]) -> list[str]:
    """`bench --quick` on top of the harness's --bench-quick: every CUDA case (seconds on a GPU); on the CPU the first
    case of each benchmark function but those of QUICK_SKIP (the whole --bench-quick subset took 6 minutes on 2
    shared cores, 2 of them in the whole-model cases)."""
    seen, keep = set(), []
    for nodeid in nodeids:
        function = nodeid.split("[", 1)[0]
        cuda = "cuda" in _TOKENS.split(nodeid.split("::")[-1])
        if cuda or (function not in seen and not function.rsplit("::", 1)[-1].startswith(QUICK_SKIP)):
            keep.append(nodeid)
        seen.add(function)
    return keep


@pytest.hookimpl(trylast=True)  # after the conftest's --bench-quick selection
def pytest_collection_modifyitems(config, items):
    sel = json.loads(os.environ.get("FASTLLM_BENCH_SELECT", "{}"))
    keep = [it for it in items if selected(it.nodeid, sel.get("device"), sel.get("dtype"), sel.get("regex"))]
    if sel.get("quick"):
        ids = set(quick_subset([it.nodeid for it in keep]))
        keep = [it for it in keep if it.nodeid in ids]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[it for it in items if it not in keep])
        items[:] = keep


def pytest_collection_finish(session):
    _emit({"total": len(session.items)})


def pytest_runtest_logreport(report):
    # one event per case: at its call phase, or at setup when setup failed or skipped (no call phase then)
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _emit({"done": report.nodeid, "outcome": report.outcome})


@pytest.hookimpl(trylast=True)  # after the conftest's summary, which finalizes the rows
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    path = os.environ.get("FASTLLM_BENCH_TABLE")
    for plugin in config.pluginmanager.get_plugins():
        h = getattr(plugin, "_HARNESS", None)
        if path and h is not None and getattr(h, "rows", None):
            with open(path, "w") as f:
                f.write(h.table() + "\n")
            return

"""`python -m fastllm bench`: the benchmark suites of benchmarks/ as one command.

pytest-benchmark stays the engine: this runs `python -m pytest benchmarks/bench_<suite>.py` in a child process with
the harness's own options (--bench-quick, --no-compile, --bench-json) and the plugin fastllm.cli._bench_plugin,
which selects the cases (--device, --dtype, -k) and reports each finished case to a small event file. This process
draws the progress bar from that file (tqdm, else rich, else one plain line per case), then prints the harness's
table and writes CSV rows and PNG plots from the harness's JSON. No timing code here.

Where the suites are: benchmarks/ is in the source checkout, not in the wheel. The CLI looks for the directory
named by FASTLLM_BENCHMARKS, else the checkout's benchmarks/ beside the fastllm package (an editable install or a
run from the repository root); without one it says that `bench` needs a source checkout (exit 2).

Suites: `ops` = attention, gemm, int8, layer_norm; `models` = models (Llama generate, encoders, per-call overhead,
threads); `all` = both; or one suite by name. --quick = the harness's --bench-quick subset without the
torch.compile rows (each compiles for ~7-30 s on 2 cores), and on the CPU only its first case of each benchmark
function, without the Llama and accelerate whole-model cases (`bench models` runs them; MiniLM stays; see
fastllm.cli._bench_plugin.quick_subset; every CUDA case stays): what keeps `bench --quick` under 2 minutes on 2
cores. `pytest benchmarks --bench-quick` still runs the harness's whole quick subset.

Selection (applied to pytest's item ids, e.g. bench_norm[cpu-add_rms_norm-4096x768-float32-fwd]):
  --device D   keep the cases whose id names device D; ids that name no device (the CPU-only int8 and per-call
               rows) count as cpu. --device cpu also hides any GPU from the child (CUDA_VISIBLE_DEVICES="").
  --dtype T    drop the cases whose id names another dtype (ids that name none, e.g. int8 rows, stay).
  -k REGEX     keep the cases whose pytest node id matches REGEX (re.search; not pytest's -k expression).

Progress (stderr): cases done / total and an ETA; on a terminal a tqdm bar, else rich's, else (or when stderr is
not a terminal) one plain line per finished case; FASTLLM_PROGRESS=tqdm|rich|plain forces one.

Outputs:
  the table    the harness's own table (benchmarks/harness.py Harness.table()), printed at the end.
  --json F     the harness's JSON: {"torch", "threads", "devices": {device: {...}}, "rows": [row, ...]}.
  --csv F      one line per row, the columns CSV_FIELDS (the JSON row's keys, in the harness Row's order);
               list/dict fields ("outputs", "dispatch") as JSON text, None as an empty cell.
  --plot DIR   PNGs (matplotlib, the optional extra fastllm[bench]): per op suite, op, dtype and device,
               `<suite>-<op>-<dtype>-<device>.png` with speedup vs eager and % of ceiling against the case size
               (FLOPs, else bytes); one `models.png` with every models row's speedup.
The pytest log (everything pytest printed) is kept beside the JSON as <json>.log (or in a temporary directory,
named in the output, without --json).
"""

import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastllm.cli import UsageError

SUITES = {"ops": ["attention", "gemm", "int8", "layer_norm"], "models": ["models"]}
SUITES["all"] = SUITES["ops"] + SUITES["models"]
for _s in SUITES["all"]:
    SUITES[_s] = [_s]
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
# the harness Row's fields, in order (benchmarks/harness.py); the CSV columns
CSV_FIELDS = ["suite", "op", "shape", "dtype", "device", "impl", "ran", "median_us", "rounds", "max_err", "worst",
              "equivalent", "outputs", "dispatch", "speedup", "vs_best", "gbps", "tflops", "pct_ceiling", "flops",
              "bytes"]  # fmt: skip
INSTALL_HINT = "pip install 'fastllm[bench]'"


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark suites (pytest-benchmark): progress, table, JSON/CSV, plots",
                       description=__doc__, formatter_class=_raw())  # fmt: skip
    p.add_argument("suite", nargs="?", default="all", choices=list(SUITES), help="which suites (default: all)")
    p.add_argument("--device", choices=DEVICES, help="only the cases on this device (default: every device here)")
    p.add_argument("--dtype", choices=DTYPES, help="drop the cases of other dtypes")
    p.add_argument("-k", dest="regex", metavar="REGEX", help="only the cases whose pytest node id matches REGEX")
    p.add_argument("--quick", action="store_true", help="a subset that finishes in under 2 minutes on 2 CPU cores")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--json", metavar="F", help="write the harness's JSON rows to F")
    p.add_argument("--csv", metavar="F", help="write the rows as CSV to F")
    p.add_argument("--plot", metavar="DIR", help="write PNG charts to DIR (needs matplotlib: " + INSTALL_HINT + ")")
    p.add_argument("--benchmarks", metavar="DIR", help="the benchmarks/ directory (default: found, see above)")


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def find_benchmarks(explicit: str | None = None) -> Path:
    """The benchmarks/ directory: --benchmarks, FASTLLM_BENCHMARKS, else the checkout's beside the package."""
    import fastllm

    candidates = [explicit, os.environ.get("FASTLLM_BENCHMARKS")]
    candidates.append(str(Path(fastllm.__file__).resolve().parent.parent / "benchmarks"))
    for c in candidates:
        if c and (Path(c) / "conftest.py").is_file() and (Path(c) / "harness.py").is_file():
            return Path(c).resolve()
        if c and c in (explicit, os.environ.get("FASTLLM_BENCHMARKS")):
            raise UsageError(f"{c} is not a fastllm benchmarks/ directory (no conftest.py and harness.py)")
    raise UsageError("the benchmark suites are in a source checkout's benchmarks/, not in the installed package: "
                     "run from a checkout (pip install -e .) or set FASTLLM_BENCHMARKS=path/to/benchmarks")  # fmt: skip


def _check_args(args) -> None:
    if args.regex is not None:
        try:
            re.compile(args.regex)
        except re.error as e:
            raise UsageError(f"-k {args.regex!r} is not a regular expression: {e}") from None
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError(f"--plot needs matplotlib: {INSTALL_HINT}") from None
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA device here")


def pytest_args(args, bench_dir: Path, json_path: Path) -> list[str]:
    files = [str(bench_dir / f"bench_{s}.py") for s in SUITES[args.suite]]
    out = [*files, "-q", "-rfE", "-p", "fastllm.cli._bench_plugin", "--bench-json", str(json_path)]
    out += ["-p", "no:cacheprovider"]
    if args.quick:
        out += ["--bench-quick", "--no-compile"]
    elif args.no_compile:
        out.append("--no-compile")
    return out


def run(args) -> int:
    _check_args(args)
    bench_dir = find_benchmarks(args.benchmarks)
    work = Path(tempfile.mkdtemp(prefix="fastllm-bench-"))  # the plugin's event and table files, the log
    if args.json:
        json_path = Path(args.json).resolve()
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.unlink(missing_ok=True)  # a stale file must not pass for this run's rows
        log_path = Path(str(json_path) + ".log")
    else:
        json_path, log_path = work / "rows.json", work / "pytest.log"
    events, table_path = work / "events.jsonl", work / "table.txt"
    env = dict(os.environ, FASTLLM_BENCH_EVENTS=str(events), FASTLLM_BENCH_TABLE=str(table_path))
    env["FASTLLM_BENCH_SELECT"] = json.dumps({"device": args.device, "dtype": args.dtype, "regex": args.regex,
                                              "quick": args.quick})  # fmt: skip
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    # the checkout root first on the path: the child imports the same fastllm as this process
    root = str(Path(__import__("fastllm").__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "pytest", *pytest_args(args, bench_dir, json_path)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=bench_dir.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _follow(proc, events)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    rc = proc.returncode
    if rc == 5 or (rc == 0 and not json_path.exists()):
        raise UsageError(f"no benchmark case matches (suite {args.suite}, device {args.device or 'any'}, "
                         f"dtype {args.dtype or 'any'}, -k {args.regex or '-'}); pytest log: {log_path}")  # fmt: skip
    if table_path.exists():
        print(table_path.read_text())
    rows = json.loads(json_path.read_text())["rows"] if json_path.exists() else []
    if args.json:
        print(f"rows written to {json_path}")
    if args.csv:
        write_csv(rows, Path(args.csv))
        print(f"CSV written to {args.csv}")
    if args.plot:
        for p in write_plots(rows, Path(args.plot)):
            print(f"plot written to {p}")
    if rc not in (0, 5):
        print(_failure_summary(log_path), file=sys.stderr)
        print(f"benchmark cases failed (pytest exit {rc}); the whole pytest log: {log_path}", file=sys.stderr)
        return 1
    return 0


def _failure_summary(log_path: Path) -> str:
    lines = log_path.read_text(errors="replace").splitlines()
    start = next((i for i, ln in enumerate(lines) if "short test summary info" in ln), max(0, len(lines) - 30))
    return "\n".join(lines[start:])


# ------------------------------------------------------------------------------------------ progress


class _Progress:
    """Cases done / total with an ETA: tqdm, else rich, else a plain line per finished case (stderr)."""

    def __init__(self):
        self.total, self.done, self.t0 = None, 0, time.monotonic()
        self._bar = self._rich = None
        self.kind = "plain"
        if sys.stderr.isatty() or os.environ.get("FASTLLM_PROGRESS"):
            want = os.environ.get("FASTLLM_PROGRESS", "")
            for kind in ("tqdm", "rich") if want in ("", "tqdm") else ("rich", "tqdm"):
                if want == "plain":
                    break
                try:
                    __import__(kind)
                    self.kind = kind
                    break
                except ImportError:
                    continue

    def start(self, total: int) -> None:
        self.total = total
        if not total:
            return  # (nothing selected: the caller says so)
        if self.kind == "tqdm":
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)
        elif self.kind == "rich":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), console=Console(stderr=True))  # fmt: skip
            self._rich.start()
            self._task = self._rich.add_task("bench", total=total)
        else:
            print(f"{total} benchmark cases", file=sys.stderr, flush=True)

    def update(self, name: str, outcome: str) -> None:
        self.done += 1
        short = name.split("::")[-1]
        if self._bar is not None:
            self._bar.set_postfix_str(f"{short} {outcome}"[:60], refresh=False)
            self._bar.update(1)
        elif self._rich is not None:
            self._rich.update(self._task, advance=1, description=short[:40])
        else:
            elapsed = time.monotonic() - self.t0
            eta = elapsed / self.done * (self.total - self.done) if self.total else 0.0
            print(f"[{self.done}/{self.total}] {short} {outcome} (elapsed {elapsed:.0f} s, ETA {eta:.0f} s)",
                  file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._rich is not None:
            self._rich.stop()


def _follow(proc: subprocess.Popen, events: Path) -> None:
    """Read the plugin's events while the child runs: {"total": n} once, then {"done": nodeid, "outcome": ...}."""
    bar, pos = _Progress(), 0

    def drain():
        nonlocal pos
        if not events.exists():
            return
        with open(events) as f:
            f.seek(pos)
            while True:
                line = f.readline()
                if not line.endswith("\n"):
                    break  # a partial line: read it whole next time
                pos = f.tell()
                ev = json.loads(line)
                if "total" in ev:
                    bar.start(ev["total"])
                else:
                    bar.update(ev["done"], ev["outcome"])

    try:
        while proc.poll() is None:
            drain()
            time.sleep(0.2)
        drain()
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------ CSV and plots


def write_csv(rows: list, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in rows:
            w.writerow([_cell(r.get(k)) for k in CSV_FIELDS])


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", s).strip("_")


def write_plots(rows: list, out_dir: Path) -> list[Path]:
    """PNG charts: one per (op suite, op, dtype, device) with speedup and % of ceiling against size, and one
    models.png. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    groups: dict = {}
    for r in rows:
        if r["suite"] != "models":
            groups.setdefault((r["suite"], r["op"], r["dtype"], r["device"]), []).append(r)
    for (suite, op, dtype, device), rs in groups.items():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for impl in dict.fromkeys(r["impl"] for r in rs):
            pts = sorted(((r["flops"] or r["bytes"], r["shape"], r) for r in rs if r["impl"] == impl),
                         key=lambda p: p[0])  # fmt: skip
            xs = [p[0] or i for i, p in enumerate(pts)]
            ax1.plot(xs, [p[2]["speedup"] or 0 for p in pts], marker="o", label=impl)
            ax2.plot(xs, [p[2]["pct_ceiling"] or 0 for p in pts], marker="o", label=impl)
        unit = "FLOPs" if any(r["flops"] for r in rs) else "bytes moved"
        for ax, what in ((ax1, "speedup vs eager (x)"), (ax2, "% of ceiling")):
            ax.set_xscale("log")
            ax.set_xlabel(f"case size ({unit})")
            ax.set_ylabel(what)
            ax.grid(True, alpha=0.3)
        ax1.axhline(1.0, color="gray", lw=0.8)
        ax1.legend(fontsize=7)
        fig.suptitle(f"{suite}: {op} {dtype} {device}")
        fig.tight_layout()
        path = out_dir / f"{_slug(f'{suite}-{op}-{dtype}-{device}')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    models = [r for r in rows if r["suite"] == "models" and r["speedup"]]
    if models:
        fig, ax = plt.subplots(figsize=(10, max(3, 0.28 * len(models))))
        labels = [f"{r['op']} {r['shape']} {r['dtype']}: {r['impl']}" for r in models]
        ax.barh(range(len(models)), [r["speedup"] for r in models])
        ax.set_yticks(range(len(models)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("speedup vs eager (x)")
        ax.set_title("models")
        fig.tight_layout()
        path = out_dir / "models.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written

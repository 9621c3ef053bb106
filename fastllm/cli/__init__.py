"""Command line: `python -m fastllm info | bench | profile`.

    python -m fastllm info                          # versions, CPU features, extension, GPUs, chosen backends
    python -m fastllm bench --quick                 # a subset of every benchmark suite (< 2 minutes on 2 cores)
    python -m fastllm bench ops --device cpu -k norm --json rows.json --csv rows.csv --plot plots/
    python -m fastllm profile minilm --batch 8 --seq 128 --trace traces/

A bad argument, MODEL or missing optional library is one line on stderr ("python -m fastllm <cmd>: error: ...")
and exit code 2; a benchmark case that fails (a fastllm output not equivalent to the float64 reference) is exit 1.
The subcommands import their own modules (transformers, pytest, matplotlib, tqdm) only when run.
"""

import argparse
import sys

PROG = "python -m fastllm"


class UsageError(Exception):
    """A bad argument, MODEL or environment: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage block first; one line is easier to read in a log
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="fastllm utilities")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    sub.add_parser("info", help="versions, CPU features, extension status, GPUs, Triton, chosen backends")
    from fastllm.cli import bench, profile

    bench.add_parser(sub)
    profile.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "info":
            from fastllm.info import report

            print(report())
            return 0
        if args.cmd == "bench":
            from fastllm.cli.bench import run
        else:
            from fastllm.cli.profile import run
        return run(args)
    except UsageError as e:
        print(f"{PROG} {args.cmd}: error: {e}", file=sys.stderr)
        return 2

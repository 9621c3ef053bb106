"""Command line: `python -m fastllm info`."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastllm", description="fastllm utilities")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, CPU features, extension status, GPUs, Triton, chosen backends")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        from fastllm.info import report

        print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())

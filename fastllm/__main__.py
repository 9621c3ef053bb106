"""Command line: `python -m fastllm info | bench | profile` (see fastllm.cli)."""

import sys

from fastllm.cli import main

if __name__ == "__main__":
    sys.exit(main())

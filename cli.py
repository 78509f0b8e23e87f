"""Command line entry point: `python cli.py grow|tune|show|eval ...` (see grow/cli.py)."""
from grow.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m grow ...` is the same as `python cli.py ...`."""
from grow.cli import main

raise SystemExit(main())

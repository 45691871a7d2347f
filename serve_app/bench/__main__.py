"""`python -m serve_app.bench ...`, the same as the `clip-bench` entry point."""

import sys

from serve_app.bench.cli import main

sys.exit(main())

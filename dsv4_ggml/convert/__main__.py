"""`python -m dsv4_ggml.convert ...`: the same as `dsv4-ggml convert ...`."""
import sys

from .cli import main

sys.exit(main())

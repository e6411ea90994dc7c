"""`python -m dsv4_ggml.cli ...`: the same as `dsv4-ggml ...`."""
import sys

from . import main

sys.exit(main())

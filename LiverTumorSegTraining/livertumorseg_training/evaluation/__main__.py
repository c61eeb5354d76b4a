"""``python -m livertumorseg_training.evaluation ...``: the same as ``livertumorseg-train evaluate ...``."""

import sys

from .command import main

sys.exit(main())

"""``python -m jaxprune.plot RUN_DIR [--out DIR]`` (same as ``jaxprune plot``)."""

import sys

from jaxprune.plot import _plots

sys.exit(_plots.main())

"""Pictures of a training run, drawn from its ``metrics.jsonl``.

Design note. Plotting reads only the metrics file the trainer already writes (one JSON event per
line), never the trainer's objects, so it works on finished, running or copied run directories
and any key may be missing: a plot is drawn only when its data exist. Figures are plain
``matplotlib.figure.Figure`` objects rendered by Agg, so nothing touches pyplot's global state or
needs a display. matplotlib is imported lazily: ``import jaxprune.plot`` works without it.

  jaxprune plot RUN_DIR            # = jaxprune.plot.main([RUN_DIR]); PNGs in RUN_DIR/plots
"""

from jaxprune.plot._plots import LAYER_KEYS as LAYER_KEYS
from jaxprune.plot._plots import main as main
from jaxprune.plot._plots import plot_run as plot_run
from jaxprune.plot._plots import read_events as read_events

"""clbench: continual-learning benchmark suite with adapter-based learners."""

import warnings

from clbench.deferred import defer

__version__ = "0.1.0"

# Avalanche imports qpsolvers (for GEM, which clbench does not run); without a QP solver
# installed, qpsolvers warns at import, and that line would precede every clbench message.
# Only that warning, from that package, is silenced.
warnings.filterwarnings(
    "ignore", message="no QP solver found", category=UserWarning, module=r"qpsolvers(\.|$)"
)
# the packages Avalanche imports for features clbench never runs load at first use
defer()

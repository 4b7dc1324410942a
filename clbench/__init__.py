"""clbench: continual-learning benchmark suite with adapter-based learners."""

__version__ = "0.1.0"

"""source-proj: training data attribution with SOURCE in a random-projection space."""

__version__ = "0.1.0"

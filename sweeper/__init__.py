"""sweeper: Ray-based experiment sweeps for PyTorch image classifiers, with training-health tracking."""

__version__ = "0.1.0"
__all__ = ["__version__"]

"""Saved as Latin-1: café."""
from sweeper.spaces import Sweep
SWEEP = Sweep(name="latin1", space={})

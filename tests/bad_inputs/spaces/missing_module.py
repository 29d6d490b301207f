"""Imports a module that is not installed."""
from sweeper.spaces import Sweep
import no_such_module_xyz  # noqa: F401

SWEEP = Sweep(name="missing_module", space={})

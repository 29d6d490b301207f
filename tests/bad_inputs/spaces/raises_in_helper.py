"""A helper function in the file raises: the line is the raise, not the call."""
from sweeper.spaces import Sweep


def widths():
    raise RuntimeError("no widths configured")


SWEEP = Sweep(name="helper", space={"model.width": widths()})

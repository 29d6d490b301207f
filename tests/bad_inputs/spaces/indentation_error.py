"""An unexpected indent."""
from sweeper.spaces import Sweep
    SWEEP = Sweep(name="indent", space={})

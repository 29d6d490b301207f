"""space given as a list."""
from sweeper.spaces import Sweep

SWEEP = Sweep(name="space_list", space=["model.arch", "vgg11"])

"""tune.quniform whose bounds are no multiples of q: Ray raises while the file is loaded."""
from ray import tune
from sweeper.spaces import Sweep

SWEEP = Sweep(name="quniform", space={"optim.momentum": tune.quniform(0, 1, 0.3)})

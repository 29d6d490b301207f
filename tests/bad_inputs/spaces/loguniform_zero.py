"""tune.loguniform from 0: Ray raises while the file is loaded."""
from ray import tune
from sweeper.spaces import Sweep

SWEEP = Sweep(name="loguniform_zero",
              space={"optim.lr": tune.loguniform(0, 1)})

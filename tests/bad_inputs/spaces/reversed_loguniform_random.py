"""loguniform bounds reversed, under random search (Ray would sample it silently)."""
from ray import tune
from sweeper.spaces import Sweep

SWEEP = Sweep(name="rev_random", space={"optim.lr": tune.loguniform(0.1, 0.001)})

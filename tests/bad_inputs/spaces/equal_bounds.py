"""tune.uniform over an empty interval."""
from ray import tune
from sweeper.spaces import Sweep

SWEEP = Sweep(name="equal_bounds", space={"optim.momentum": tune.uniform(0.5, 0.5)})

"""A grid axis under Optuna."""
from ray import tune
from sweeper.spaces import Sweep

SWEEP = Sweep(name="grid_optuna", space={"model.init": tune.grid_search(["he", "xavier"])},
              search="optuna")

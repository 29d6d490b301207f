"""A choice Optuna cannot store (a tuple)."""
from ray import tune
from sweeper.spaces import Sweep

SWEEP = Sweep(name="object_choice", space={"model.init": tune.choice(["he", ("normal", 0.01)])},
              search="optuna")

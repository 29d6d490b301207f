"""A valid, small Optuna sweep: the base for optuna-specific override cases."""
from ray import tune
from sweeper.spaces import Sweep

SWEEP = Sweep(
    name="good_optuna",
    space={"model.arch": "smallcnn", "model.width": 0.125, "data.name": "digits",
           "optim.lr": tune.loguniform(1e-3, 1e-1)},
    search="optuna", num_samples=4, max_epochs=2,
)

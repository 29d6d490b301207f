"""A normal distribution under Optuna."""
from ray import tune
from sweeper.spaces import Sweep

SWEEP = Sweep(name="randn_optuna", space={"optim.momentum": tune.randn(0.9, 0.01)}, search="optuna")

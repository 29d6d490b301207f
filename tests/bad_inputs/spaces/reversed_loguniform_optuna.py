"""loguniform bounds reversed, under Optuna."""
from ray import tune
from sweeper.spaces import Sweep

SWEEP = Sweep(name="rev_optuna", space={"optim.lr": tune.loguniform(0.1, 0.001)}, search="optuna")

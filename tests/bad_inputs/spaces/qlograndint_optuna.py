"""A stepped log-scaled integer under Optuna."""
from ray import tune
from sweeper.spaces import Sweep

SWEEP = Sweep(name="qlogint_optuna", space={"data.batch_size": tune.qlograndint(16, 256, 16)},
              search="optuna")

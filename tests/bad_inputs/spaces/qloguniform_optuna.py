"""A quantised log-uniform under Optuna (its step would be dropped)."""
from ray import tune
from sweeper.spaces import Sweep

SWEEP = Sweep(name="qlog_optuna", space={"optim.lr": tune.qloguniform(0.001, 0.1, 0.001)},
              search="optuna")

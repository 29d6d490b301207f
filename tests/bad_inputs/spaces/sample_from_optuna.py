"""tune.sample_from under Optuna."""
from ray import tune
from sweeper.spaces import Sweep

SWEEP = Sweep(name="sample_from", space={"optim.lr": tune.sample_from(lambda cfg: 0.01)},
              search="optuna")

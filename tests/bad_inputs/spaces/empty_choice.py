"""tune.choice([]) survives construction; Sweep refuses it."""
from ray import tune
from sweeper.spaces import Sweep

SWEEP = Sweep(name="empty_choice", space={"model.init": tune.choice([])})

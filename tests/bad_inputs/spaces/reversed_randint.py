"""tune.randint with its bounds the wrong way round."""
from ray import tune
from sweeper.spaces import Sweep

SWEEP = Sweep(name="reversed_randint", space={"model.arch": "vgg", "model.depth": tune.randint(20, 11)})

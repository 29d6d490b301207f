"""A sweep reference inside tune.choice: it is resolved once, before Ray starts, so it cannot be sampled."""
from ray import tune
from sweeper.spaces import Sweep

SWEEP = Sweep(
    name="init_from_choice",
    space={"model.arch": "vgg16", "model.width": 0.125, "data.name": "digits",
           "model.init_from": tune.choice([None, "sweep:vgg_a/best"])},
    max_epochs=2,
)

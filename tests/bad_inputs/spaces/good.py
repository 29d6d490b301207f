"""A valid, small sweep: the base that command-line cases break with overrides."""
from ray import tune
from sweeper.spaces import Sweep

SWEEP = Sweep(
    name="good",
    space={"model.arch": tune.grid_search(["vgg11", "smallcnn"]), "model.width": 0.125,
           "data.name": "digits", "optim.lr": tune.loguniform(1e-3, 1e-1)},
    max_epochs=2,
)

"""Several bad values: all reported at once."""
from ray import tune
from sweeper.spaces import Sweep

SWEEP = Sweep(name="bad_values", space={"model.arch": tune.grid_search(["vgg11", "vgg99"]),
                                        "optim.lr": -0.1, "model.init": "kaiming2"})

"""A resources function that raises when the dry run calls it."""
from sweeper.spaces import Sweep


def per_trial(cfg):
    gpus = {"vgg19": 0.5}
    return {"cpu": 1, "gpu": gpus[cfg.model.arch]}


SWEEP = Sweep(name="resources_raise", space={"model.arch": "vgg11", "model.width": 0.125},
              resources=per_trial)

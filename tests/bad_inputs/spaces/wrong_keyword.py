"""A misspelt Sweep keyword."""
from sweeper.spaces import Sweep

SWEEP = Sweep(name="wrong_keyword", space={"model.arch": "vgg11"}, metrics="val_accuracy")

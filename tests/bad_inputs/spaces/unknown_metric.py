"""A metric no trial reports."""
from sweeper.spaces import Sweep

SWEEP = Sweep(name="unknown_metric", space={"model.arch": "vgg11"}, metric="val_acc")

"""A metric reported only after the last epoch."""
from sweeper.spaces import Sweep

SWEEP = Sweep(name="test_metric", space={"model.arch": "vgg11"}, metric="test_accuracy")

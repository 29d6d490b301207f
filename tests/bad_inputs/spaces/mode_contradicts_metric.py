"""mode='max' on a loss keeps the worst trials."""
from sweeper.spaces import Sweep

SWEEP = Sweep(name="mode_contradicts", space={"model.arch": "vgg11"}, metric="val_loss", mode="max")

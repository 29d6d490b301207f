"""Two Sweeps: which one to run?"""
from sweeper.spaces import Sweep

SWEEP = Sweep(name="first", space={"model.arch": "vgg11"})
OTHER = Sweep(name="second", space={"model.arch": "vgg13"})

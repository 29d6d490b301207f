"""Defines no Sweep."""
from ray import tune

SPACE = {"model.arch": tune.grid_search(["vgg11", "vgg13"])}

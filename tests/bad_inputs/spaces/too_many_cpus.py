"""Asks every trial for more CPUs than any machine here has: it would wait PENDING forever."""
from sweeper.spaces import Sweep

SWEEP = Sweep(
    name="too_many_cpus",
    space={"model.arch": "smallcnn", "data.name": "digits"},
    resources={"cpu": 4096},
    max_epochs=1,
)

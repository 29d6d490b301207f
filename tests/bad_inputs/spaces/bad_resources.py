"""Resources that are not 'cpu' / 'gpu'."""
from sweeper.spaces import Sweep

SWEEP = Sweep(name="bad_resources", space={}, resources={"cpu": 1, "tpu": 1})

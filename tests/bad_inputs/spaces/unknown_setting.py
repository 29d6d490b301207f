"""A setting under a name people reach for."""
from sweeper.spaces import Sweep

SWEEP = Sweep(name="unknown_setting", space={"optim.learning_rate": 0.01})

"""A Sweep setting put in the space."""
from sweeper.spaces import Sweep

SWEEP = Sweep(name="field_in_space", space={"max_epochs": 5})

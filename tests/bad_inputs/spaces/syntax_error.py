"""A missing closing parenthesis."""
from sweeper.spaces import Sweep

SWEEP = Sweep(name="syntax", space={"model.arch": "vgg11"}
x = 1

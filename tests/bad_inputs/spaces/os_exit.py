"""Ends its own process while being loaded."""
import os
os._exit(0)

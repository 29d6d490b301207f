"""Never finishes loading."""
from sweeper.spaces import Sweep
while True: pass  # noqa: E701

import os

import pytest
import torch

# Tests share 2 cores with each other's processes; more threads only thrash.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test session decodes datasets into its own cache, never the user's."""
    cache = tmp_path_factory.getbasetemp() / "sweeper-cache"
    monkeypatch.setenv("SWEEPER_CACHE_DIR", str(cache))

"""Under pytest-xdist (``-n 2`` in the README's test command) each worker runs torch on one thread, and so do the
processes its tests start: two one-thread workers keep both cores busy, where two workers with torch's default of
one thread per core would oversubscribe them. Measured on 2 cores: the suite in 630 s this way, 953 s in one
process with two threads."""
import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker; the controller and a plain `pytest` keep the defaults
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)

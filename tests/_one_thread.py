"""A module-scoped fixture that runs a test file's small networks on one torch thread (import it into the file)."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Networks this small run as fast on one thread, and a busy shared machine does not slow them tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Fixtures of the TRL integration's tests, imported by each of their modules (autouse there)."""

import pytest
import torch

import fdpo.integrations.trl as fdpo_trl


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these matrices are tiny, and threads only contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def stock_trl():
    """Every test starts and ends with TRL's own functions installed (`fdpo_trl.uninstall()`)."""
    fdpo_trl.uninstall()
    yield
    fdpo_trl.uninstall()

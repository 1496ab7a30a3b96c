"""Fixtures and helpers of the TRL integration's tests, imported by each of their modules (fixtures autouse)."""

from contextlib import AbstractContextManager

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


def gather_recorder(entered: list) -> type[AbstractContextManager]:
    """A stand-in for TRL's `maybe_gather_lm_head_ctx(weight, bias)` that appends the weight to `entered`
    each time it is entered."""
    class Gather(AbstractContextManager):
        def __init__(self, *params):
            self.params = params

        def __enter__(self):
            entered.append(self.params[0])

        def __exit__(self, *exc):
            return False

    return Gather

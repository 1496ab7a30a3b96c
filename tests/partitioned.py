"""A ZeRO-3-like parameter for the tests of the heads' `gather` contexts."""

from contextlib import contextmanager

import torch


class Partitioned:
    """A ZeRO-3-like parameter: its .data is an empty tensor except inside the context `gather()` returns.

    forward_only: the context restores the data on its first entry only (a backward that would
    rely on the forward's gather reads the empty tensor).
    """

    def __init__(self, value: torch.Tensor, forward_only: bool = False) -> None:
        self.param = torch.nn.Parameter(value.clone())
        self.param.ds_shape = value.shape  # DeepSpeed's record of the full shape
        self.full, self.forward_only, self.entries = self.param.data, forward_only, 0
        self.param.data = torch.empty(0, dtype=value.dtype, device=value.device)

    @contextmanager
    def gather(self):
        self.entries += 1
        if self.entries == 1 or not self.forward_only:
            self.param.data = self.full
        try:
            yield
        finally:
            self.param.data = torch.empty(0, dtype=self.full.dtype, device=self.full.device)

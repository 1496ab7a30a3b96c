"""Allocation tracking for CPU (and any device): the largest tensor and the peak of live bytes.

`AllocationTracker` is a TorchDispatchMode: every tensor an operator creates inside the `with`
block (forward and autograd backward alike) is recorded by its storage. It reports the largest
tensor created (in elements) and the peak of bytes held by tensors created inside the block,
which on CPU stands in for `torch.cuda.max_memory_allocated`. Memory that Triton kernels or other
non-torch code allocate themselves is not seen; tensors that outputs alias are counted once.
"""

import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class AllocationStats:
    """What an `AllocationTracker` saw: largest tensor, peak and current live bytes."""

    largest_numel: int = 0
    largest_shape: tuple[int, ...] = ()
    largest_op: str = ""
    peak_bytes: int = 0
    live_bytes: int = 0
    _live: dict[int, int] = field(default_factory=dict, repr=False)


class AllocationTracker(TorchDispatchMode):
    """Record the tensors created inside the block.

    Example:
        with AllocationTracker() as tracker:
            loss = fdpo.token_logprobs(h, w, y, backend="torch").sum()
            loss.backward()
        tracker.stats.largest_numel, tracker.stats.peak_bytes
    """

    def __init__(self) -> None:
        super().__init__()
        self.stats = AllocationStats()

    def _release(self, key: int) -> None:
        self.stats.live_bytes -= self.stats._live.pop(key, 0)

    def _record(self, tensor: torch.Tensor, op_name: str) -> None:
        if tensor.device.type == "meta":
            return
        if tensor.numel() > self.stats.largest_numel:
            self.stats.largest_numel = tensor.numel()
            self.stats.largest_shape = tuple(tensor.shape)
            self.stats.largest_op = op_name
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.stats._live or storage.nbytes() == 0:
            return
        self.stats._live[key] = storage.nbytes()
        self.stats.live_bytes += storage.nbytes()
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.live_bytes)
        weakref.finalize(storage, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._record(value, str(func.overloadpacket.__name__))
        return out

"""FSDP2-sharded head parameters, read whole by the fused heads."""

import torch
from torch.distributed.tensor import DTensor, Partial


def full_parameter(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """`tensor` itself, or a DTensor gathered whole for the fused kernels.

    A head parameter reaches the fused head as a DTensor when FSDP2 did not gather it: its module has
    its own `fully_shard` group, and the head's forward (FSDP's hook) is never called because the fused
    head reads the weight directly. `full_tensor()` all-gathers it; its backward must then do what
    FSDP does to the gradients of the parameters it gathers itself: reduce-scatter the full gradient
    with the average over the mesh (FSDP2's default reduction). `full_tensor()` without
    `grad_placements` treats the gradient as replicated and hands each process its own slice of its
    own batch's gradient, unreduced.
    """
    if not isinstance(tensor, DTensor):
        return tensor
    return tensor.full_tensor(grad_placements=[Partial("avg")] * tensor.device_mesh.ndim)

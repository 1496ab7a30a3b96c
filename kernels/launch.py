"""Block-size tables and the `Launch` record every launcher builds before running a kernel.

A launcher first builds a `Launch` (kernel, grid, runtime arguments, constexprs, warps, stages) and
then calls it. Building and running are split so that `fdpo.kernels.aot` can compile exactly what
the launchers run, for any GPU architecture, on a machine without a GPU.
"""

import contextlib
from dataclasses import dataclass, replace
from typing import Any

import torch
import triton

from fdpo.heads import HeadInput, head_compute_dtype

# Integer kernel arguments that change from batch to batch: the padded length T (ref_T), the number
# of pairs P and the number of vocabulary splits of a small batch. Triton specialises an int argument
# on `== 1` and `% 16 == 0` by default, so each would compile another variant of its kernel the first
# time a batch falls on the other side (seconds of compilation at a random early step, on one rank of
# a data-parallel job while the others wait). They only bound loops and divide row indices, which
# lose nothing as plain runtime ints. Every kernel is decorated
# `@triton.jit(do_not_specialize=BATCH_SIZED)`. The scored-row count R keeps its specialisation: its
# `% 16` class shapes the row masks' code (unspecialised, the fp32 atomics backward spills 356 B
# instead of 28 B on sm_90), so a run compiles each kernel at most twice more for it.
BATCH_SIZED = ("T", "ref_T", "P", "num_splits")


def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from .tiles import INTERPRETED

    return INTERPRETED


def runs_on(device: torch.device) -> bool:
    """Whether the kernels run on tensors on `device`: CUDA, or CPU when interpreting."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


@dataclass(frozen=True)
class Tiles:
    """Block shape and launch options of one kernel on one target.

    block_n rows (tokens) x block_v columns (vocabulary) of logits per tile, reduced over the hidden
    size in chunks of block_d; group_n row tiles share one weight tile in grouped orderings.
    """

    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    group_n: int = 8


# The interpreter runs every block operation in numpy: large blocks keep the test suite fast,
# while test shapes stay larger than one block in every dimension so that masks and loops run.
_INTERPRETER = Tiles(block_n=64, block_v=128, block_d=64, num_warps=4, num_stages=1)

# GPU tiles for 16-bit inputs: 128 x 128 logits per program keeps the tensor cores busy with an
# fp32 accumulator of 64 registers per thread at 8 warps; the hidden-size chunk of 64 keeps
# `num_stages` pipelined copies of the [block_n, block_d] and [block_d, block_v] operand tiles
# within 96 KB of shared memory (sm_80 allows 163 KB, sm_90 227 KB). fp32 inputs with full-precision
# products (torch's default "highest" matmul precision) run on FMA units, whose register-hungry
# dot needs smaller tiles: these are the spill-free or least-spilling shapes `python -m
# fdpo.kernels.aot` found for sm_80 and sm_90.
_GPU = {
    ("forward", 2): Tiles(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=3),
    ("forward", 4): Tiles(block_n=64, block_v=128, block_d=32, num_warps=8, num_stages=2),
    ("backward", 2): Tiles(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=2),
    # 16 warps: the fp32 backward's three FMA dots spilled 652 B on sm_90 at 8 warps, at most 40 B here.
    ("backward", 4): Tiles(block_n=128, block_v=128, block_d=16, num_warps=16, num_stages=2),
    # The two-head forward keeps a policy and a reference logit tile (and their exponentials) live
    # at once: half the rows per program keeps it within the register file.
    ("two_heads", 2): Tiles(block_n=64, block_v=128, block_d=64, num_warps=8, num_stages=3),
    ("two_heads", 4): Tiles(block_n=64, block_v=64, block_d=32, num_warps=8, num_stages=2),
    ("two_heads_backward", 2): Tiles(block_n=64, block_v=128, block_d=64, num_warps=8, num_stages=2),
    ("two_heads_backward", 4): Tiles(block_n=64, block_v=128, block_d=16, num_warps=8, num_stages=2),
    # A mixed-dtype head's backward (fp32 products, one operand converted in registers): the fp32
    # backward tiles spilled 964 B on sm_80, 64 x 128 still 308 B; 64 x 64 spills none.
    ("mixed_backward", 4): Tiles(block_n=64, block_v=64, block_d=16, num_warps=8, num_stages=2),
}


def tiles_for(kind: str, dtype: torch.dtype, *operands: torch.Tensor) -> Tiles:
    """Tiles of the `kind` ("forward", "backward", "two_heads", "two_heads_backward" or, fp32 only,
    "mixed_backward") kernels whose products are formed in `dtype`, reading `operands` (the heads'
    hidden states and weights; `staged`)."""
    if interpreting():
        return _INTERPRETER
    return staged(_GPU[(kind, dtype.itemsize)], dtype, *operands)


def staged(tiles: Tiles, dtype: torch.dtype, *operands: torch.Tensor) -> Tiles:
    """`tiles` of products formed in `dtype` for operand tensors of any width: where an operand is wider
    than `dtype` (float32 tensors of a head computed in 16 bits, rounded in registers), block_d
    shrinks by the same factor, so that the operand tiles the pipeline stages in shared memory and
    loads into registers keep the bytes of the 16-bit tiles they were sized for."""
    widest = max((t.dtype.itemsize for t in operands), default=dtype.itemsize)
    if widest <= dtype.itemsize:
        return tiles
    return replace(tiles, block_d=tiles.block_d * dtype.itemsize // widest)


def widened(head: HeadInput) -> bool:
    """Whether `head` forms float32 products from a 16-bit hidden-state or weight tensor, converted in
    registers: its backward takes the "mixed_backward" tiles."""
    return head_compute_dtype(head) == torch.float32 and {head.hidden.dtype, head.weight.dtype} != {torch.float32}


def input_precision(dtype: torch.dtype) -> str:
    """`tl.dot` precision for fp32 inputs, following torch's own float32 matmul setting.

    torch.get_float32_matmul_precision() == "highest" (torch's default) keeps full fp32 products;
    "high" or "medium" allows TF32 tensor cores, as it does for torch.matmul. 16-bit inputs
    always use their own tensor-core path and ignore this.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


@dataclass
class Launch:
    """A kernel launch, fully specified: `launch()` runs it, `fdpo.kernels.aot` compiles it."""

    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__

    @property
    def device(self) -> torch.device | None:
        """The CUDA device of the launch's tensors (the launchers check they share one); None on the CPU."""
        for value in self.args.values():
            if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                return value.device
        return None

    def __call__(self) -> None:
        # Triton launches on the current CUDA device and its stream: with the tensors on another GPU
        # (device_map="auto" puts the LM head on the last one) the kernel would read another device's
        # pointers, so their device is made current for the launch.
        device = self.device
        with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
            self.kernel[self.grid](**self.args, **self.constexprs,
                                   num_warps=self.num_warps, num_stages=self.num_stages)


def tile_gradient_launches(kernel: Any, args: dict[str, Any], constexprs: dict[str, Any], tiles: Tiles,
                           num_rows: int, vocab: int, *, need_hidden: bool, need_weight: bool, need_bias: bool,
                           deterministic: bool) -> list[Launch]:
    """The launches of a fused tile-gradient backward kernel (the schedules of `tiles.backward_tile`):
    one program per (row tile, vocabulary tile) in grouped order adding with atomics, or with
    `deterministic` one launch per row tile owning dHidden and one per vocabulary tile owning dWeight
    and dBias, each adding in a fixed order. `kernel` takes ORDERED, WEIGHT_SIDE, GRAD_H, GRAD_W,
    GRAD_B and GROUP_N besides `constexprs`; nothing is launched for gradients not needed."""
    row_tiles, vocab_tiles = triton.cdiv(num_rows, tiles.block_n), triton.cdiv(vocab, tiles.block_v)
    options = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    launches = []
    if not deterministic and (need_hidden or need_weight or need_bias):
        launches.append(Launch(
            kernel, grid=(row_tiles * vocab_tiles,), args=args,
            constexprs=dict(constexprs, ORDERED=False, WEIGHT_SIDE=False, GRAD_H=need_hidden, GRAD_W=need_weight,
                            GRAD_B=need_bias, GROUP_N=tiles.group_n), **options))
    if deterministic and need_hidden:
        launches.append(Launch(
            kernel, grid=(row_tiles,), args=args,
            constexprs=dict(constexprs, ORDERED=True, WEIGHT_SIDE=False, GRAD_H=True, GRAD_W=False, GRAD_B=False,
                            GROUP_N=1), **options))
    if deterministic and (need_weight or need_bias):
        launches.append(Launch(
            kernel, grid=(vocab_tiles,), args=args,
            constexprs=dict(constexprs, ORDERED=True, WEIGHT_SIDE=True, GRAD_H=False, GRAD_W=need_weight,
                            GRAD_B=need_bias, GROUP_N=1), **options))
    return launches


def bf16_products(head: HeadInput) -> HeadInput:
    """`head` with its products formed in bfloat16 (`fdpo.LMHead.compute_dtype`): the variant of float32
    operands under bfloat16 autocast, for `fdpo.kernels.aot`."""
    return replace(head, head=replace(head.head, compute_dtype=torch.bfloat16))


def meta_operands(dtype: torch.dtype, batch: int = 4, seq: int = 1024, vocab: int = 32000,
                  dim: int = 4096) -> dict[str, torch.Tensor]:
    """Meta-device operands of one LM head at a realistic size, for building launches to compile.

    hidden [batch, seq, dim], weight [vocab, dim] and bias [vocab] of `dtype`; rows int64,
    labels and seq_ids int32, and a float32 per-row vector `f32`, all [batch * seq].
    """
    n = batch * seq
    return dict(
        hidden=torch.empty(batch, seq, dim, dtype=dtype, device="meta"),
        weight=torch.empty(vocab, dim, dtype=dtype, device="meta"),
        bias=torch.empty(vocab, dtype=dtype, device="meta"),
        rows=torch.empty(n, dtype=torch.int64, device="meta"),
        labels=torch.empty(n, dtype=torch.int32, device="meta"),
        seq_ids=torch.empty(n, dtype=torch.int32, device="meta"),
        f32=torch.empty(n, dtype=torch.float32, device="meta"),
    )

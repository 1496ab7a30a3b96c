"""A roofline cost model of the LM-head log-prob forward + backward: predicted times and scratch memory.

Everything this module returns is a prediction from public peak figures and the assumptions named
below, not a measurement; `python -m benchmarks` measures. It predicts, for a shape (N scored
tokens, vocabulary V, hidden size D, dtype) on a device (A100-SXM4-80GB, H100-SXM5, H200-SXM):

- fdpo's Triton forward and its two backward strategies: "fused" (one kernel recomputes every
  [BLOCK_N, BLOCK_V] logit tile and adds its dHidden and dWeight contributions with fp32 atomics)
  and "split" (for each chunk of C rows a fused kernel recomputes the logits and writes the chunk's
  dz [C, V] into a buffer in the head dtype, then dH[chunk] = dz W and dW += dz^T H[chunk] run as
  tensor-core GEMMs accumulating in fp32);
- the peers: naive PyTorch (materialized logits), TRL's fused head, Liger-Kernel's fused linear
  cross entropy, cut-cross-entropy (exact, and its default gradient filtering) and fdpo's own
  `torch` backend;

and `choose_backward` picks "fused" or "split" from those predictions: the triton backend follows it
on the devices `known_device` recognizes (`fdpo.options.BackwardOptions`), with chunks of
`split_rows` rows, the rows the split backward itself uses.

Model. Every kernel's time is max(flops / (peak x efficiency), HBM bytes / (bandwidth x
efficiency)) plus a launch latency; kernels run one after another (their times add); atomic
accumulation is added to the time of the kernel that issues it (not overlapped with its matmuls).
HBM bytes are compulsory traffic: each operand read once and each output written once per kernel
(operand re-reads between tiles are assumed to hit L2), plus the read-modify-writes of
accumulators named per algorithm. Scratch is the most bytes an algorithm holds at once beyond its
inputs and the gradients it returns in the head dtype (fp32 gradient accumulators count).
Matmuls of 16-bit heads run on the tensor cores; those of float32 heads follow the float32 matmul
precision as fdpo's kernels and torch's GEMMs do: the FP32 units at "highest", the TF32 tensor cores
otherwise. The setting is torch's own (torch.get_float32_matmul_precision()), read when a prediction
is made, unless a function is given `fp32_precision` to predict for another.
Times are in seconds, sizes in bytes, rates in FLOP/s and bytes/s throughout. The `predict_*`
functions and `choose_backward` take a device by name; the per-algorithm functions take a DeviceSpec.
"""

import re
from dataclasses import dataclass

import torch

# --- efficiency assumptions (fractions of the datasheet peak; none is a vendor figure) ---------

# cuBLAS dense GEMMs with every dimension in the thousands reach roughly 70-80 % of the dense
# tensor-core peak on A100 and H100 in public GEMM benchmarks; assumed 0.75.
GEMM_EFFICIENCY = 0.75
# Fused Triton tile kernels (fdpo's, cut-cross-entropy's): a 128 x 128 x 64 tensor-core tile loop
# with a softmax on each finished tile, and no warp-specialized overlap; assumed 0.65 of peak
# (about 0.87 of cuBLAS).
TRITON_TILE_EFFICIENCY = 0.65
# Streaming kernels (casts, elementwise passes, accumulator read-modify-writes) sustain roughly
# 85-90 % of the datasheet HBM bandwidth; assumed 0.85.
BANDWIDTH_EFFICIENCY = 0.85
# A GEMM whose reduction depth K is below this many elements spends a share of its time in the
# per-tile prologue and epilogue that the main loop no longer hides; its efficiency is scaled by
# K / GEMM_FULL_DEPTH (assumed linear).
GEMM_FULL_DEPTH = 512
# Output tile of a cuBLAS GEMM, for wave quantization: ceil(tiles / SMs) waves, the last one partly
# idle (assumed 128 x 128; cuBLAS picks among 128 x 128 and 128 x 256 on these GPUs).
GEMM_TILE = 128
# Host-side cost of each kernel launched from Python (CUDA launch latency plus PyTorch dispatch),
# about 5 microseconds; it matters only for small shapes and for the many-launch chunked loops.
KERNEL_LAUNCH_S = 5e-6
# An accumulator stays in L2 between the tiles that add to it while its working set is at most this
# share of the L2 (the rest holds the streamed operands); assumed one half.
L2_RESIDENT_FRACTION = 0.5

# --- block shapes of the algorithms modelled --------------------------------------------------

# fdpo's backward tiles for 16-bit inputs (kernels/launch.py: 128 x 128 logits per program, row
# tiles grouped by 8 so that neighbouring programs share a weight tile).
FDPO_BLOCK_N = 128
FDPO_BLOCK_V = 128
FDPO_GROUP_N = 8
# cut-cross-entropy's backward tiles: its autotuner's 128 x 128 configurations, grouped by 8 rows.
CCE_BLOCK = 128
# TRL 1.16 `trl.kernels.chunked_logprob`: TOKEN_CHUNK_SIZE = 4096 rows, and the vocabulary width
# its fused LM head passes as chunk_size (32768).
TRL_TOKEN_CHUNK = 4096
TRL_VOCAB_CHUNK = 32768

# --- the split-K backward's buffer ------------------------------------------------------------

# Buffer rows are a multiple of the dz kernel's row tile, so that every chunk is whole tiles (budgets
# of fewer rows than one tile keep all the rows they hold).
SPLIT_ROW_MULTIPLE = FDPO_BLOCK_N
# The split is a candidate only with chunks of at least this many rows. A guard, not a model output:
# below about 1000 rows the fp32 dW read-modify-write of every chunk (8 V D bytes) outlasts the
# chunk's dW GEMM (2 C V D flops) on every device listed (break-even C = 4 x GEMM rate / bandwidth:
# about 460 rows on A100, 890 on H100, 620 on H200), where the roofline's max() is most optimistic,
# and a problem with fewer scored rows than this is small enough for the single fused launch.
MIN_SPLIT_ROWS = 1024
# 1 GiB: at V = 128256 in bfloat16 it holds 4096 rows (exactly TRL's token chunk), where the
# chunk's dH and dW GEMMs (reduction depths V and 4096) run at full tensor-core efficiency and the
# fp32 dW read-modify-write per chunk takes under a quarter of the dW GEMM's time even on H100; it
# is small next to the model itself (an 8B-parameter model's bfloat16 weights alone are 16 GB) and
# next to the fp32 dWeight accumulator both strategies hold anyway (2 GiB at V = 128256, D = 4096).
DEFAULT_BACKWARD_BUFFER_BYTES = 1 << 30

STRATEGIES = ("fused", "split")

# torch.set_float32_matmul_precision's settings. "highest" (torch's default) keeps float32 matmuls on
# the FP32 units; "high" and "medium" let cuBLAS and fdpo's kernels (`tl.dot` in TF32:
# kernels/launch.py, input_precision) use the TF32 tensor cores, priced at DeviceSpec.tf32_flops.
FP32_PRECISIONS = ("highest", "high", "medium")

FP32_BYTES = 4


@dataclass(frozen=True)
class DeviceSpec:
    """Public peak figures of one GPU, and the assumed fp32 atomic-add throughput.

    flops are dense (no sparsity) FLOP/s; bandwidths bytes/s; l2_bytes the L2 capacity.
    atomic_bytes_per_s is the rate at which fp32 reduction payload (4 bytes per added value) is
    absorbed by the L2 when the target lines are resident; reductions whose lines are not resident
    also cost an HBM read and write of the line (see `atomic_seconds`).
    """

    name: str
    bf16_flops: float
    tf32_flops: float
    fp32_flops: float
    hbm_bytes_per_s: float
    l2_bytes: int
    sms: int
    atomic_bytes_per_s: float


# fp32 global reductions (red.global.add.f32, and on sm_90 the .v4.f32 vector form) are executed by
# the L2 slices; NVIDIA publishes no throughput for them, nor an L2 bandwidth for Hopper. Assumption:
# a reduction costs the L2 a read and a write of its bytes, so the payload rate is half the L2
# bandwidth, taken as about 5 TB/s on A100 and 7 TB/s on H100/H200 (the order of public
# microbenchmarks, e.g. https://chipsandcheese.com/p/nvidias-h100-funny-l2-and-tons-of-bandwidth,
# which measured the PCIe H100 and the SXM4 A100). These two figures are the model's least
# certain: a GPU run of the fused backward at a large shape calibrates them.
ATOMIC_L2_FRACTION = 0.5
_A100_L2_BYTES_PER_S = 5.0e12
_HOPPER_L2_BYTES_PER_S = 7.0e12

# A100 SXM4 80GB: bf16 312 TFLOP/s, TF32 156 TFLOP/s, FP32 19.5 TFLOP/s (dense), HBM2e 2,039 GB/s
# (NVIDIA A100 datasheet,
# https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf);
# 40 MB L2 and 108 SMs (NVIDIA A100 Tensor Core GPU Architecture whitepaper,
# https://images.nvidia.com/aem-dam/en-zz/Solutions/data-center/nvidia-ampere-architecture-whitepaper.pdf).
A100_SXM_80GB = DeviceSpec(
    name="A100-SXM4-80GB", bf16_flops=312e12, tf32_flops=156e12, fp32_flops=19.5e12,
    hbm_bytes_per_s=2.039e12, l2_bytes=40 * 1024**2, sms=108,
    atomic_bytes_per_s=ATOMIC_L2_FRACTION * _A100_L2_BYTES_PER_S,
)
# H100 SXM5 80GB: bf16 989.4 TFLOP/s, TF32 494.7 TFLOP/s dense (the datasheet's 1,979 / 989 are
# with sparsity), FP32 66.9 TFLOP/s, HBM3 3.35 TB/s (NVIDIA H100 datasheet,
# https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet); 50 MB L2 and
# 132 SMs (NVIDIA H100 Tensor Core GPU Architecture whitepaper,
# https://resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper).
H100_SXM = DeviceSpec(
    name="H100-SXM5-80GB", bf16_flops=989.4e12, tf32_flops=494.7e12, fp32_flops=66.9e12,
    hbm_bytes_per_s=3.35e12, l2_bytes=50 * 1024**2, sms=132,
    atomic_bytes_per_s=ATOMIC_L2_FRACTION * _HOPPER_L2_BYTES_PER_S,
)
# H200 SXM 141GB: the H100's GH100 compute (bf16 989 TFLOP/s, TF32 494 TFLOP/s dense, FP32 67
# TFLOP/s) with HBM3e at 4.8 TB/s (NVIDIA H200 datasheet,
# https://resources.nvidia.com/en-us-data-center-overview-mc/en-us-data-center-overview/hpc-datasheet-sc23-h200);
# L2 and SM count as H100 SXM5 (same die; assumed, the datasheet does not list them).
H200_SXM = DeviceSpec(
    name="H200-SXM-141GB", bf16_flops=989.4e12, tf32_flops=494.7e12, fp32_flops=66.9e12,
    hbm_bytes_per_s=4.8e12, l2_bytes=50 * 1024**2, sms=132,
    atomic_bytes_per_s=ATOMIC_L2_FRACTION * _HOPPER_L2_BYTES_PER_S,
)

DEVICES: dict[str, DeviceSpec] = {"a100": A100_SXM_80GB, "h100": H100_SXM, "h200": H200_SXM}
# A device as the functions below accept it (see `device_spec`).
DeviceLike = str | torch.device | DeviceSpec


def device_spec(device: DeviceLike) -> DeviceSpec:
    """The spec of `device`: a short name ("a100", "h100", "h200"), a CUDA device name as
    torch.cuda.get_device_name reports it ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB",
    "NVIDIA H200"), a CUDA torch.device, or a DeviceSpec (returned as is).

    Raises ValueError for anything else, their figures differing: PCIe, NVL and 40 GB variants
    ("NVIDIA H100 PCIe", "NVIDIA H200 NVL"), GH200, and MIG slices of the known GPUs ("NVIDIA H100
    80GB HBM3 MIG 1g.10gb": a share of the SMs, L2 and memory bandwidth).
    """
    if isinstance(device, DeviceSpec):
        return device
    if isinstance(device, torch.device):
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"no cost model for device {device}: known devices are {sorted(DEVICES)}")
        device = torch.cuda.get_device_name(device)
    name = str(device).strip().lower()
    if name in DEVICES:
        return DEVICES[name]
    refused = ValueError(f"no cost model for device {device!r}: known devices are {sorted(DEVICES)} "
                         "(or their CUDA names: NVIDIA A100-SXM4-80GB, NVIDIA H100 80GB HBM3, NVIDIA H200)")
    # The H200 NVL is the PCIe card, at lower clocks (NVIDIA's H200 datasheet, cited at H200_SXM: BF16
    # 1,671 TFLOP/s with sparsity, about 836 dense, and FP32 60 TFLOP/s, against the SXM's 1,979 and
    # 67); a MIG slice has a fraction of its GPU's SMs, L2 and memory bandwidth.
    if re.search(r"\b(nvl|mig)\b", name):
        raise refused
    if "h200" in name and "gh200" not in name:  # GH200 (Grace Hopper) has its own memory figures
        return H200_SXM
    if "h100" in name and "hbm3" in name:      # the SXM5 part; the PCIe part reports "H100 PCIe"
        return H100_SXM
    if "a100" in name and "sxm4-80gb" in name:
        return A100_SXM_80GB
    raise refused


@dataclass(frozen=True)
class Shape:
    """One LM-head problem: `tokens` scored rows of hidden size `hidden` under a [vocab, hidden] head."""

    tokens: int
    vocab: int
    hidden: int
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        for field in ("tokens", "vocab", "hidden"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {self.dtype}")

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def logits(self) -> int:
        """N x V, the number of logits."""
        return self.tokens * self.vocab

    def matmul_flops(self) -> int:
        """2 N V D: one [N, D] x [D, V] product (or any of the backward's two, same count)."""
        return 2 * self.tokens * self.vocab * self.hidden


@dataclass(frozen=True)
class Prediction:
    """Predicted forward and backward seconds and scratch bytes of one implementation at one shape."""

    name: str
    forward_s: float
    backward_s: float
    scratch_bytes: int
    note: str = ""

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s


def fp32_matmul_precision(fp32_precision: str | None = None) -> str:
    """The float32 matmul precision a prediction assumes: `fp32_precision` (one of FP32_PRECISIONS),
    or torch's own setting now (torch.get_float32_matmul_precision()) when None.

    Raises ValueError for any other string.
    """
    if fp32_precision is None:
        return torch.get_float32_matmul_precision()
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be None or one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    return fp32_precision


def matmul_flops_per_s(device: DeviceSpec, dtype: torch.dtype, fp32_precision: str | None = None) -> float:
    """Dense matmul peak for inputs of `dtype`: the tensor cores for 16-bit inputs; for float32 the
    TF32 tensor cores, or the FP32 units when the float32 matmul precision (`fp32_matmul_precision`
    of `fp32_precision`: torch's current setting when None) is "highest"."""
    if dtype != torch.float32:
        return device.bf16_flops
    return device.fp32_flops if fp32_matmul_precision(fp32_precision) == "highest" else device.tf32_flops


def floor_flops(tokens: int, vocab: int, hidden: int) -> int:
    """4 x 2 N V D: forward logits, backward recompute, dHidden and dWeight, each an [N,V,D] matmul."""
    return 4 * 2 * tokens * vocab * hidden


def atomic_payload_bytes(tokens: int, vocab: int, hidden: int, block_n: int = FDPO_BLOCK_N,
                         block_v: int = FDPO_BLOCK_V, accumulator_bytes: int = FP32_BYTES) -> int:
    """Bytes added atomically by a tile-wise backward: every [block_n, block_v] tile adds a
    [block_n, D] slab to dHidden and a [block_v, D] slab to dWeight, so N V D (1/block_n + 1/block_v)
    values of `accumulator_bytes` each (whole tiles assumed)."""
    return tokens * vocab * hidden * (block_n + block_v) * accumulator_bytes // (block_n * block_v)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _stream_seconds(num_bytes: float, device: DeviceSpec, launches: int = 1) -> float:
    """A bandwidth-bound pass over `num_bytes` of HBM traffic, `launches` kernels."""
    return num_bytes / (device.hbm_bytes_per_s * BANDWIDTH_EFFICIENCY) + launches * KERNEL_LAUNCH_S


def gemm_seconds(m: int, n: int, k: int, dtype: torch.dtype, device: DeviceSpec, *, out_bytes: int,
                 accumulate: bool = False, fp32_precision: str | None = None) -> float:
    """A cuBLAS [m, k] x [k, n] GEMM in `dtype` writing an output of `out_bytes` per element
    (reading it first when `accumulate`, as addmm into an accumulator does), at the float32 matmul
    precision `fp32_precision` (see `matmul_flops_per_s`)."""
    tiles = _cdiv(m, GEMM_TILE) * _cdiv(n, GEMM_TILE)
    waves = _cdiv(tiles, device.sms)
    efficiency = GEMM_EFFICIENCY * tiles / (waves * device.sms) * min(1.0, k / GEMM_FULL_DEPTH)
    compute = 2 * m * n * k / (matmul_flops_per_s(device, dtype, fp32_precision) * efficiency)
    traffic = dtype.itemsize * (m * k + k * n) + out_bytes * m * n * (2 if accumulate else 1)
    return max(compute, traffic / (device.hbm_bytes_per_s * BANDWIDTH_EFFICIENCY)) + KERNEL_LAUNCH_S


def tile_kernel_seconds(flops: float, num_bytes: float, dtype: torch.dtype, device: DeviceSpec, *,
                        fp32_precision: str | None = None) -> float:
    """A fused Triton tile kernel doing `flops` of matmul work with `num_bytes` of HBM traffic, at the
    float32 matmul precision `fp32_precision` (see `matmul_flops_per_s`)."""
    compute = flops / (matmul_flops_per_s(device, dtype, fp32_precision) * TRITON_TILE_EFFICIENCY)
    return max(compute, num_bytes / (device.hbm_bytes_per_s * BANDWIDTH_EFFICIENCY)) + KERNEL_LAUNCH_S


def atomic_seconds(shape: Shape, device: DeviceSpec, *, block_n: int, block_v: int, group_n: int,
                   accumulator_bytes: int) -> float:
    """Time of a tile-wise backward's accumulation into dHidden [N, D] and dWeight [V, D].

    The larger of the L2's reduction throughput on the whole payload and the HBM traffic of the
    accumulator lines that are not resident: each row-tile group (group_n row tiles that sweep the
    vocabulary together) adds to every dWeight line while it is in L2, so dWeight is read and
    written once per group unless it fits in the resident share of L2 (then once); a group's
    dHidden rows stay resident during its sweep if they fit, else every addition to them misses.
    """
    payload = atomic_payload_bytes(shape.tokens, shape.vocab, shape.hidden, block_n, block_v,
                                   accumulator_bytes)
    resident = device.l2_bytes * L2_RESIDENT_FRACTION
    d_weight = shape.vocab * shape.hidden * accumulator_bytes
    d_hidden = shape.tokens * shape.hidden * accumulator_bytes
    groups = _cdiv(_cdiv(shape.tokens, block_n), group_n)
    weight_rmw = 2 * d_weight * (1 if d_weight <= resident else groups)
    group_rows = min(shape.tokens, group_n * block_n) * shape.hidden * accumulator_bytes
    hidden_payload = shape.tokens * shape.vocab * shape.hidden * accumulator_bytes // block_v
    hidden_rmw = 2 * (d_hidden if group_rows <= resident else hidden_payload)
    return max(payload / device.atomic_bytes_per_s,
               (weight_rmw + hidden_rmw) / (device.hbm_bytes_per_s * BANDWIDTH_EFFICIENCY))


def _fp32_grads(shape: Shape) -> int:
    """Bytes of float32 dHidden [N, D] and dWeight [V, D] accumulators."""
    return FP32_BYTES * (shape.tokens + shape.vocab) * shape.hidden


def _cast_grads_seconds(shape: Shape, device: DeviceSpec) -> float:
    """Zeroing the fp32 dHidden and dWeight accumulators, and casting them to the head dtype at the
    end (4 kernels: write 4, then read 4 and write the head dtype, per element)."""
    elements = (shape.tokens + shape.vocab) * shape.hidden
    return _stream_seconds(elements * (2 * FP32_BYTES + shape.itemsize), device, 4)


def fdpo_forward(shape: Shape, device: DeviceSpec, *, fp32_precision: str | None = None) -> tuple[float, int]:
    """(seconds, scratch bytes) of fdpo's fused Triton forward: one pass of logit tiles with an
    online log-sum-exp, then the launch of the kernel that combines the vocabulary splits' partial
    LSEs (the splits keep the GPU full; their partial LSEs are a few float32 vectors)."""
    traffic = shape.itemsize * (shape.tokens + shape.vocab) * shape.hidden
    splits = max(1, min(_cdiv(2 * device.sms, _cdiv(shape.tokens, FDPO_BLOCK_N)), _cdiv(shape.vocab, FDPO_BLOCK_V)))
    return (tile_kernel_seconds(shape.matmul_flops(), traffic, shape.dtype, device, fp32_precision=fp32_precision)
            + KERNEL_LAUNCH_S,
            FP32_BYTES * shape.tokens * (splits + 3))


def fused_backward(shape: Shape, device: DeviceSpec, *, fp32_precision: str | None = None) -> tuple[float, int]:
    """(seconds, scratch bytes) of the fused-atomics backward: one kernel recomputes each logit tile
    and adds dz W to dHidden and dz^T H to dWeight with fp32 atomics (3 matmul-equivalents)."""
    traffic = shape.itemsize * (shape.tokens + shape.vocab) * shape.hidden
    seconds = tile_kernel_seconds(3 * shape.matmul_flops(), traffic, shape.dtype, device,
                                  fp32_precision=fp32_precision)
    seconds += atomic_seconds(shape, device, block_n=FDPO_BLOCK_N, block_v=FDPO_BLOCK_V, group_n=FDPO_GROUP_N,
                              accumulator_bytes=FP32_BYTES)
    return seconds + _cast_grads_seconds(shape, device), _fp32_grads(shape)


def split_rows(vocab: int, dtype: torch.dtype, buffer_bytes: int) -> int:
    """Rows C of the split backward's dz buffer [C, vocab] of `dtype` within `buffer_bytes`, as the
    split backward (`fdpo.kernels.head_stats_split_backward`) uses them: the most rows that fit,
    rounded down to a whole multiple of SPLIT_ROW_MULTIPLE when at least one multiple fits; 0 when
    not even one row fits (the fused backward's case)."""
    if buffer_bytes < 0:
        raise ValueError(f"buffer_bytes must be >= 0, got {buffer_bytes}")
    rows = buffer_bytes // (vocab * dtype.itemsize)
    return rows if rows < SPLIT_ROW_MULTIPLE else rows - rows % SPLIT_ROW_MULTIPLE


def _chunk_rows(shape: Shape, buffer_bytes: int) -> int:
    """Rows per chunk the split backward uses: split_rows, but never more than the scored rows."""
    return min(split_rows(shape.vocab, shape.dtype, buffer_bytes), shape.tokens)


def split_backward(shape: Shape, device: DeviceSpec, buffer_bytes: int, *,
                   fp32_precision: str | None = None) -> tuple[float, int]:
    """(seconds, scratch bytes) of the split-K backward with a dz buffer of `buffer_bytes`.

    Per chunk of C rows: a fused kernel recomputes the [C, V] logits and writes dz in the head
    dtype (reading H[chunk] and W, writing C V values); dH[chunk] = dz W, a GEMM writing fp32; and
    dW += dz^T H[chunk], a GEMM accumulating into the fp32 dWeight (read and written per chunk).
    Raises ValueError when the buffer holds not even one row.
    """
    rows = _chunk_rows(shape, buffer_bytes)
    if rows == 0:
        raise ValueError(f"a {buffer_bytes}-byte buffer holds no row of [rows, {shape.vocab}] {shape.dtype}")
    v, d, size = shape.vocab, shape.hidden, shape.itemsize

    def chunk(c: int) -> float:
        dz = tile_kernel_seconds(2 * c * v * d, size * (c * d + v * d + c * v), shape.dtype, device,
                                 fp32_precision=fp32_precision)
        d_hidden = gemm_seconds(c, d, v, shape.dtype, device, out_bytes=FP32_BYTES, fp32_precision=fp32_precision)
        d_weight = gemm_seconds(v, d, c, shape.dtype, device, out_bytes=FP32_BYTES, accumulate=True,
                                fp32_precision=fp32_precision)
        return dz + d_hidden + d_weight

    full, rest = divmod(shape.tokens, rows)
    seconds = full * chunk(rows) + (chunk(rest) if rest else 0.0)
    return seconds + _cast_grads_seconds(shape, device), rows * v * size + _fp32_grads(shape)


def predict_forward(shape: Shape, device: DeviceLike, *, fp32_precision: str | None = None) -> tuple[float, int]:
    """(predicted seconds, predicted scratch bytes) of fdpo's Triton forward, at the float32 matmul
    precision `fp32_precision` (torch's current setting when None; `matmul_flops_per_s`)."""
    return fdpo_forward(shape, device_spec(device), fp32_precision=fp32_matmul_precision(fp32_precision))


def predict_backward(strategy: str, shape: Shape, device: DeviceLike,
                     buffer_bytes: int = DEFAULT_BACKWARD_BUFFER_BYTES, *,
                     fp32_precision: str | None = None) -> tuple[float, int]:
    """(predicted seconds, predicted scratch bytes) of fdpo's backward `strategy` ("fused" or "split"),
    at the float32 matmul precision `fp32_precision` (torch's current setting when None)."""
    spec, fp32_precision = device_spec(device), fp32_matmul_precision(fp32_precision)
    if strategy == "fused":
        return fused_backward(shape, spec, fp32_precision=fp32_precision)
    if strategy == "split":
        return split_backward(shape, spec, buffer_bytes, fp32_precision=fp32_precision)
    raise ValueError(f"unknown backward strategy {strategy!r}: expected one of {STRATEGIES}")


def split_allowed(shape: Shape, buffer_bytes: int) -> bool:
    """Whether the split strategy is a candidate: its chunks hold at least MIN_SPLIT_ROWS rows."""
    return _chunk_rows(shape, buffer_bytes) >= MIN_SPLIT_ROWS


def known_device(device: torch.device) -> DeviceSpec | None:
    """The spec of `device` when it is a CUDA device this model knows (see `device_spec`); None for
    any other device (the CPU, GPUs without figures here)."""
    if device.type != "cuda":
        return None
    try:
        return device_spec(device)
    except ValueError:
        return None


def choose_backward(tokens: int, vocab: int, hidden: int, dtype: torch.dtype,
                    device: DeviceLike,
                    buffer_bytes: int = DEFAULT_BACKWARD_BUFFER_BYTES, *,
                    fp32_precision: str | None = None) -> str:
    """The backward strategy `auto` runs: "split" when the buffer holds chunks of at least
    MIN_SPLIT_ROWS rows (never at buffer_bytes == 0, nor when there are fewer scored rows) and its
    predicted time is lower than the fused backward's; "fused" otherwise. A float32 head is predicted
    at the float32 matmul precision `fp32_precision`, torch's current setting when None (the one
    fdpo's kernels and torch's GEMMs follow when they run).

    The split is priced with a 16-bit head's GEMMs on the tensor cores accumulating in fp32; where
    torch has no such GEMM on the device (`fdpo.gemm.accumulating_16bit_gemm`) the split runs fp32
    GEMMs of upcast copies instead, and `fdpo.options.BackwardOptions` runs the fused backward
    there without asking this function."""
    shape, spec = Shape(tokens, vocab, hidden, dtype), device_spec(device)
    if not split_allowed(shape, buffer_bytes):
        return "fused"
    fp32_precision = fp32_matmul_precision(fp32_precision)
    fused_s, _ = predict_backward("fused", shape, spec, fp32_precision=fp32_precision)
    split_s, _ = predict_backward("split", shape, spec, buffer_bytes, fp32_precision=fp32_precision)
    return "split" if split_s < fused_s else "fused"


# --- the peers ---------------------------------------------------------------------------------

# Naive PyTorch (fdpo backend="reference", what preference trainers do): bytes per logit of its
# elementwise passes beyond the logits GEMM's own output. Forward: .float() reads 2 and writes 4;
# log_softmax reads its fp32 input twice (max and sum, then the output pass) and writes 4: 18 for a
# 16-bit head. Backward: the gather's backward zero-fills a 4-byte gradient; log_softmax's backward
# reads the gradient twice (row sum, then output pass) and the saved output once and writes 4 (16);
# the cast back to 16 bits reads 4 and writes 2: 26 (the two backward GEMMs read the 16-bit dlogits
# as their operand). For a float32 head the casts vanish: 12 and 20.
NAIVE_FORWARD_BYTES_PER_LOGIT = {2: 18, 4: 12}
NAIVE_BACKWARD_BYTES_PER_LOGIT = {2: 26, 4: 20}
# Peak scratch in logits: forward, the fp32 logits and log_softmax's fp32 output (8 bytes; the 16-bit
# GEMM output is freed by the cast before); backward, the saved output, the gather's gradient and
# log_softmax's input gradient (12 bytes).
NAIVE_SCRATCH_BYTES_PER_LOGIT = 12

# fdpo's `torch` backend, bytes per logit of its elementwise torch ops on each float32 chunk.
# Forward (OnlineSoftmax.update): amax reads 4; z - m reads 4, writes 4; exp in place reads 4, writes
# 4; sum reads 4: 24. Backward: z - lse (8), exp in place (8), times (g_kl - g) in place (8), and the
# scale / temperature factor in place (8; skipped when it is 1): 32 at most.
TORCH_FORWARD_BYTES_PER_LOGIT = 24
TORCH_BACKWARD_BYTES_PER_LOGIT = 32
# Kernels per chunk besides the GEMMs (forward: amax, maximum, two exps, sums, rescales, label
# pickup; backward: sub, exp, mul, scatter, div), for the launch latency.
TORCH_FORWARD_LAUNCHES_PER_CHUNK = 12
TORCH_BACKWARD_LAUNCHES_PER_CHUNK = 8


def naive(shape: Shape, device: DeviceSpec, *, fp32_precision: str | None = None) -> Prediction:
    """float32 logits, log_softmax, gather: 3 matmuls (no recompute), [N, V] tensors in HBM."""
    n, v, d, size = shape.tokens, shape.vocab, shape.hidden, shape.itemsize
    forward = (gemm_seconds(n, v, d, shape.dtype, device, out_bytes=size, fp32_precision=fp32_precision)
               + _stream_seconds(NAIVE_FORWARD_BYTES_PER_LOGIT[size] * shape.logits, device, 3))
    backward = (_stream_seconds(NAIVE_BACKWARD_BYTES_PER_LOGIT[size] * shape.logits, device, 4)
                + gemm_seconds(n, d, v, shape.dtype, device, out_bytes=size, fp32_precision=fp32_precision)
                + gemm_seconds(v, d, n, shape.dtype, device, out_bytes=size, fp32_precision=fp32_precision))
    return Prediction("naive", forward, backward, NAIVE_SCRATCH_BYTES_PER_LOGIT * shape.logits,
                      "materializes [N, V]; 3 matmuls, no recompute")


def trl(shape: Shape, device: DeviceSpec, *, fp32_precision: str | None = None) -> Prediction:
    """TRL 1.16 ChunkedLogProbFunction: cuBLAS on [4096, 32768] tiles in the head dtype, a Triton
    pass per tile for the online LSE (reads the tile) and, in the backward, one that overwrites the
    recomputed tile with dz (reads and writes it), then addmm into fp32 dH and dW."""
    n, v, d, size = shape.tokens, shape.vocab, shape.hidden, shape.itemsize
    forward = backward = 0.0
    for r0 in range(0, n, TRL_TOKEN_CHUNK):
        rows = min(TRL_TOKEN_CHUNK, n - r0)
        for v0 in range(0, v, TRL_VOCAB_CHUNK):
            cols = min(TRL_VOCAB_CHUNK, v - v0)
            logits = gemm_seconds(rows, cols, d, shape.dtype, device, out_bytes=size, fp32_precision=fp32_precision)
            forward += logits + _stream_seconds(size * rows * cols, device)
            backward += (logits + _stream_seconds(2 * size * rows * cols, device)
                         + gemm_seconds(rows, d, cols, shape.dtype, device, out_bytes=FP32_BYTES, accumulate=True,
                                        fp32_precision=fp32_precision)
                         + gemm_seconds(cols, d, rows, shape.dtype, device, out_bytes=FP32_BYTES, accumulate=True,
                                        fp32_precision=fp32_precision))
    tile = min(n, TRL_TOKEN_CHUNK) * min(v, TRL_VOCAB_CHUNK) * size
    return Prediction("trl", forward, backward + _cast_grads_seconds(shape, device), tile + _fp32_grads(shape),
                      f"cuBLAS on [{TRL_TOKEN_CHUNK}, {TRL_VOCAB_CHUNK}] tiles, fp32 addmm accumulators")


def liger_chunk_rows(tokens: int, vocab: int, hidden: int) -> int:
    """Liger-Kernel's fused linear cross entropy chunk: next_power_of_2(ceil(N / ceil(V / D))), at most N."""
    chunk = 1 << (_cdiv(tokens, _cdiv(vocab, hidden)) - 1).bit_length()
    return min(chunk, tokens)


def liger(shape: Shape, device: DeviceSpec, *, fp32_precision: str | None = None) -> Prediction:
    """Liger-Kernel's liger_fused_linear_cross_entropy (reduction="none"): chunks of rows; the forward
    computes each chunk's [C, V] logits and its loss kernel (reads them); the backward, given per-token
    gradients, recomputes them, overwrites them with dz (reads twice, writes once), then dH[chunk] =
    dz W and dW += dz^T H[chunk] accumulating in the head dtype (its default accum_dtype)."""
    n, v, d, size = shape.tokens, shape.vocab, shape.hidden, shape.itemsize
    rows = liger_chunk_rows(n, v, d)
    forward = backward = 0.0
    for r0 in range(0, n, rows):
        c = min(rows, n - r0)
        logits = gemm_seconds(c, v, d, shape.dtype, device, out_bytes=size, fp32_precision=fp32_precision)
        forward += logits + _stream_seconds(size * c * v, device)
        backward += (logits + _stream_seconds(3 * size * c * v, device)
                     + gemm_seconds(c, d, v, shape.dtype, device, out_bytes=size, fp32_precision=fp32_precision)
                     + gemm_seconds(v, d, c, shape.dtype, device, out_bytes=size, accumulate=True,
                                    fp32_precision=fp32_precision))
    backward += _stream_seconds(size * (n + v) * d, device, 2)      # zero-filled gradients
    return Prediction("liger", forward, backward, rows * v * size,
                      f"chunks of {rows} rows; dW accumulated in {str(shape.dtype).removeprefix('torch.')}")


def cce(shape: Shape, device: DeviceSpec, *, filtered: bool, fp32_precision: str | None = None) -> Prediction:
    """cut-cross-entropy's Triton kernels: a fused forward like fdpo's, and a backward that recomputes
    each 128 x 128 tile and adds its dE and dC slabs in the head dtype under spin locks (a locked
    read-modify-write, costed like an atomic of that size). `filtered` (its default filter_eps="auto")
    skips the two gradient matmuls and the adds of tiles whose |dz| is below the threshold, so its
    number here is the exact one, an upper bound; the recompute alone is the lower bound noted."""
    traffic = shape.itemsize * (shape.tokens + shape.vocab) * shape.hidden
    # The LSE kernel (one pass of logit tiles, as the backward's recompute), then the launch of its
    # label-logit kernel (an indexed dot over N x D).
    recompute = tile_kernel_seconds(shape.matmul_flops(), traffic, shape.dtype, device, fp32_precision=fp32_precision)
    forward = recompute + KERNEL_LAUNCH_S
    backward = (tile_kernel_seconds(3 * shape.matmul_flops(), traffic, shape.dtype, device,
                                    fp32_precision=fp32_precision)
                + atomic_seconds(shape, device, block_n=CCE_BLOCK, block_v=CCE_BLOCK, group_n=FDPO_GROUP_N,
                                 accumulator_bytes=shape.itemsize)
                + _stream_seconds(shape.itemsize * (shape.tokens + shape.vocab) * shape.hidden, device, 2))
    scratch = FP32_BYTES * 2 * shape.tokens
    if filtered:
        return Prediction("cce", forward, backward, scratch,
                          f"upper bound: skipped gradient tiles make it faster, at least "
                          f"{(forward + recompute) * 1e3:.1f} ms (predicted) with every tile skipped")
    return Prediction("cce-exact", forward, backward, scratch,
                      f"dE, dC added in {str(shape.dtype).removeprefix('torch.')} under locks")


def fdpo_torch(shape: Shape, device: DeviceSpec, *, fp32_precision: str | None = None) -> Prediction:
    """fdpo's `torch` backend on CUDA: chunks of CHUNK_ROWS x CHUNK_VOCAB (fdpo/backends/chunked.py),
    online LSE forward, recomputing backward with GEMMs into float32 dH and dW. A 16-bit head is multiplied as it is
    (16-bit GEMMs with fp32 output and accumulation; dz cast to the head dtype before its two
    products); a float32 head runs float32 matmuls, on the FP32 units at the float32 matmul precision
    "highest", else on the TF32 tensor cores (`matmul_flops_per_s`)."""
    from .backends.chunked import CHUNK_ROWS, CHUNK_VOCAB  # here: the backends import this module

    fp32_precision = fp32_matmul_precision(fp32_precision)
    n, v, d, size = shape.tokens, shape.vocab, shape.hidden, shape.itemsize
    forward = backward = 0.0
    for r0 in range(0, n, CHUNK_ROWS):
        rows = min(CHUNK_ROWS, n - r0)
        gather = _stream_seconds(2 * size * rows * d, device)
        forward += gather
        backward += gather
        for v0 in range(0, v, CHUNK_VOCAB):
            cols = min(CHUNK_VOCAB, v - v0)
            # dz's cast to the head dtype: read 4, write the head dtype, per logit.
            cast = _stream_seconds((FP32_BYTES + size) * rows * cols, device) if size != FP32_BYTES else 0.0
            logits = gemm_seconds(rows, cols, d, shape.dtype, device, out_bytes=FP32_BYTES,
                                  fp32_precision=fp32_precision)
            forward += logits + _stream_seconds(TORCH_FORWARD_BYTES_PER_LOGIT * rows * cols, device,
                                                TORCH_FORWARD_LAUNCHES_PER_CHUNK)
            backward += (logits + cast
                         + _stream_seconds(TORCH_BACKWARD_BYTES_PER_LOGIT * rows * cols, device,
                                           TORCH_BACKWARD_LAUNCHES_PER_CHUNK)
                         + gemm_seconds(rows, d, cols, shape.dtype, device, out_bytes=FP32_BYTES, accumulate=True,
                                        fp32_precision=fp32_precision)
                         + gemm_seconds(cols, d, rows, shape.dtype, device, out_bytes=FP32_BYTES, accumulate=True,
                                        fp32_precision=fp32_precision))
    rows, cols = min(n, CHUNK_ROWS), min(v, CHUNK_VOCAB)
    # z and dz (formed in p's buffer) in float32; the gathered h and (16-bit heads) dz's cast, in the head dtype.
    chunk = FP32_BYTES * 2 * rows * cols + size * (rows * d + rows * cols * (size != FP32_BYTES))
    if size != FP32_BYTES:
        note = "16-bit chunk GEMMs with fp32 accumulation"
    elif fp32_precision == "highest":
        note = "float32 chunks on the FP32 units (no tensor cores)"
    else:
        note = "float32 chunks on the TF32 tensor cores"
    return Prediction("fdpo-torch", forward, backward + _cast_grads_seconds(shape, device),
                      chunk + _fp32_grads(shape), note)


def floor_seconds(shape: Shape, device: DeviceLike, *, fp32_precision: str | None = None) -> float:
    """The 4-matmul floor: 4 x a cuBLAS [N, D] x [D, V] GEMM, as the benchmarks measure it."""
    return 4 * gemm_seconds(shape.tokens, shape.vocab, shape.hidden, shape.dtype, device_spec(device),
                            out_bytes=shape.itemsize, fp32_precision=fp32_matmul_precision(fp32_precision))


def predict_all(shape: Shape, device: DeviceLike, buffer_bytes: int = DEFAULT_BACKWARD_BUFFER_BYTES, *,
                fp32_precision: str | None = None) -> list[Prediction]:
    """Predictions of fdpo's strategies ("fdpo-fused", "fdpo-split" when the buffer holds a chunk)
    and of every peer at `shape` on `device`, at the float32 matmul precision `fp32_precision`
    (torch's current setting when None; `matmul_flops_per_s`)."""
    spec, fp32_precision = device_spec(device), fp32_matmul_precision(fp32_precision)
    forward_s, forward_scratch = predict_forward(shape, spec, fp32_precision=fp32_precision)
    out = []
    for strategy in STRATEGIES:
        if strategy == "split" and _chunk_rows(shape, buffer_bytes) == 0:
            continue
        backward_s, backward_scratch = predict_backward(strategy, shape, spec, buffer_bytes,
                                                        fp32_precision=fp32_precision)
        note = ("fp32 atomics into dH and dW" if strategy == "fused" else
                f"chunks of {_chunk_rows(shape, buffer_bytes)} rows, GEMMs into fp32 dH and dW")
        out.append(Prediction(f"fdpo-{strategy}", forward_s, backward_s, max(forward_scratch, backward_scratch),
                              note))
    out.append(fdpo_torch(shape, spec, fp32_precision=fp32_precision))
    out += [naive(shape, spec, fp32_precision=fp32_precision), trl(shape, spec, fp32_precision=fp32_precision),
            liger(shape, spec, fp32_precision=fp32_precision),
            cce(shape, spec, filtered=False, fp32_precision=fp32_precision),
            cce(shape, spec, filtered=True, fp32_precision=fp32_precision)]
    return out

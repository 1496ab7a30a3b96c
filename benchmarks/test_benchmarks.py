"""pytest-benchmark suite: `pytest benchmarks/` (the default test command collects tests/ only).

One benchmark per workload and implementation at one shape: on a GPU N=8192, V=128256, D=4096 in
bfloat16; on CPU N=2048, V=32000, D=256 in float32. Each first checks the implementation against the
float64 naive result on the same inputs (values and gradients; for the workloads of DRIFT_CHECKED
also on inputs whose reference is CHECK_DRIFT away from the policy), then times forward+backward (each
timed call waits for the device to finish the step: CUDA runs kernels asynchronously) and records
the peak memory above the inputs in `extra_info`. Implementations that cannot run here (not
installed, or CUDA only) are skipped with the reason. Compare runs with pytest-benchmark's own
options, e.g. `pytest benchmarks/ --benchmark-autosave` then `pytest-benchmark compare`.
"""

import functools
from collections.abc import Callable

import pytest
import torch

from .measure import peak_bytes, synchronize
from .workloads import (
    CHECK_DRIFT,
    DRIFT_CHECKED,
    IMPLEMENTATIONS,
    REGISTRY,
    WORKLOADS,
    Inputs,
    allowed_error,
    check,
    float64_reference,
    make_inputs,
    step,
    unavailable,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    TOKENS, VOCAB, HIDDEN, DTYPE = 8192, 128256, 4096, torch.bfloat16
else:
    TOKENS, VOCAB, HIDDEN, DTYPE = 2048, 32000, 256, torch.float32


@functools.cache
def implementation(name: str):
    return REGISTRY[name].build()


@functools.cache
def inputs_and_reference(workload: str):
    """The inputs of `workload`, their float64 reference and the largest relative error accepted on them."""
    inputs = make_inputs(workload, TOKENS, VOCAB, HIDDEN, dtype=DTYPE, device=DEVICE)
    return inputs, float64_reference(inputs), allowed_error(inputs)


@functools.cache
def drift_check(workload: str):
    """`inputs_and_reference` with the reference CHECK_DRIFT away (its float64 reference on the CPU)."""
    inputs = make_inputs(workload, TOKENS, VOCAB, HIDDEN, dtype=DTYPE, device=DEVICE, drift=CHECK_DRIFT)
    return inputs, tuple(t.cpu() for t in float64_reference(inputs)), allowed_error(inputs)


def synchronized_step(impl: Callable[[Inputs], torch.Tensor], inputs: Inputs) -> None:
    """One step of `impl`, returned when the device has finished it."""
    step(impl, inputs)
    synchronize(DEVICE)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_forward_backward(benchmark, workload: str, name: str) -> None:
    reason = unavailable(name, DEVICE, workload)
    if reason is not None:
        pytest.skip(reason)
    impl = implementation(name)
    inputs, expected, allowed = inputs_and_reference(workload)
    errors = check(impl, inputs, expected)
    assert max(errors.values()) <= allowed, f"{name} disagrees with the float64 reference: {errors}"
    if workload in DRIFT_CHECKED:
        drifted, drift_expected, drift_allowed = drift_check(workload)
        drift_errors = check(impl, drifted, drift_expected)
        assert max(drift_errors.values()) <= drift_allowed, (
            f"{name} disagrees with the float64 reference at reference drift {CHECK_DRIFT:g}: {drift_errors}")
    benchmark.extra_info.update(tokens=TOKENS, vocab=VOCAB, hidden=HIDDEN, dtype=str(DTYPE), errors=errors,
                                peak_bytes=peak_bytes(lambda: step(impl, inputs), DEVICE)[0])
    benchmark.pedantic(synchronized_step, args=(impl, inputs), rounds=5 if DEVICE.type == "cuda" else 3,
                       warmup_rounds=1)
    inputs.reset_grads()

"""The pytest-benchmark suite (benchmarks/test_benchmarks.py) times each step to its end on the device: the
timed callable synchronizes after the step (CUDA runs kernels asynchronously)."""

import pytest
import torch

from benchmarks import test_benchmarks as suite


class FakeBenchmark:
    """pytest-benchmark's fixture, reduced to what the suite calls: pedantic runs the callable each round."""

    def __init__(self) -> None:
        self.extra_info: dict = {}

    def pedantic(self, target, args=(), rounds=1, warmup_rounds=0) -> None:
        for _ in range(rounds + warmup_rounds):
            target(*args)


@pytest.fixture
def tiny(monkeypatch):
    """The suite at N = 64, V = 128, D = 8 on CPU in float32, its cached inputs cleared before and after."""
    for name, value in (("TOKENS", 64), ("VOCAB", 128), ("HIDDEN", 8), ("DEVICE", torch.device("cpu")),
                        ("DTYPE", torch.float32)):
        monkeypatch.setattr(suite, name, value)
    suite.inputs_and_reference.cache_clear()
    yield
    suite.inputs_and_reference.cache_clear()


def test_each_timed_step_is_synchronized(monkeypatch, tiny):
    events = []
    monkeypatch.setattr(suite, "synchronize", lambda device: events.append(("synchronize", device.type)))
    step = suite.step
    monkeypatch.setattr(suite, "step", lambda impl, inputs: (events.append(("step", None)), step(impl, inputs))[1])
    suite.test_forward_backward(FakeBenchmark(), "logprobs", "naive")
    timed = events[events.index(("synchronize", "cpu")) - 1:]
    assert timed == [("step", None), ("synchronize", "cpu")] * 4, events


def test_the_suite_still_checks_before_it_times(monkeypatch, tiny):
    wrong = suite.REGISTRY["naive"].build()
    monkeypatch.setattr(suite, "implementation", lambda name: lambda inputs: wrong(inputs) * 1.01)
    with pytest.raises(AssertionError, match="disagrees with the float64 reference"):
        suite.test_forward_backward(FakeBenchmark(), "logprobs", "naive")


def test_the_suite_checks_the_drift_checked_workloads_at_check_drift(monkeypatch, tiny):
    monkeypatch.setattr(suite, "TOKENS", 256)
    suite.drift_check.cache_clear()
    checked = []
    check = suite.check
    monkeypatch.setattr(suite, "check", lambda impl, inputs, expected: (checked.append(inputs),
                                                                       check(impl, inputs, expected))[1])
    try:
        suite.test_forward_backward(FakeBenchmark(), "tdpo", "naive")
        assert [id(inputs) for inputs in checked] == [id(suite.inputs_and_reference("tdpo")[0]),
                                                      id(suite.drift_check("tdpo")[0])]
        drifted = checked[1]
        assert (drifted.ref_weight - drifted.weight).norm() > 50 * (checked[0].ref_weight - checked[0].weight).norm()
    finally:
        suite.drift_check.cache_clear()

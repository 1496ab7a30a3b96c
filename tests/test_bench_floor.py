"""The matmul floor and the GPU check's predictions count the scored tokens (those fdpo computes), not the
ignored ones, and every record says both N and the scored count."""

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import gpu_check, measure, workloads
from fdpo import cost

CPU = torch.device("cpu")
H100 = cost.DEVICES["h100"]


@pytest.mark.parametrize(("workload", "tokens", "pairs", "scored"), [
    ("logprobs", 100, 2, 87), ("logprobs", 4096, 2, 3584), ("dpo-js", 64, 2, 48), ("tdpo", 4096, 2, 3072),
    ("epsilon-dpo", 96, 3, 72), ("divergence", 72, 2, 56),
])
def test_scored_tokens_are_those_of_the_inputs(workload, tokens, pairs, scored):
    assert workloads.scored_tokens(workload, tokens, pairs) == scored
    inputs = workloads.make_inputs(workload, tokens, 64, 8, dtype=torch.float32, device=CPU, pairs=pairs)
    assert int((inputs.labels != -100).sum()) == scored


def test_the_floor_matmul_is_timed_at_the_scored_rows(monkeypatch):
    rows = []

    def matmul_call(tokens, vocab, dim, **kwargs):
        rows.append(tokens)
        return measure.matmul_call(tokens, vocab, dim, **kwargs)

    monkeypatch.setattr(cli, "matmul_call", matmul_call)
    args = cli.parse_args(["--quick", "--tokens", "64", "--vocab", "512", "--hidden", "16", "--repeats", "1",
                           "--workloads", "dpo-reverse_kl", "--impls", "naive", "fdpo-torch"])
    shape = {"workload": "dpo-reverse_kl", "tokens": 64, "vocab": 512, "hidden": 16, "dtype": "float32"}
    records = cli.measure_shape(args, cli.Runner(args, CPU), shape, torch.float32, CPU)
    assert rows == [48]
    for r in records:
        assert (r["tokens"], r["scored_tokens"], r["pairs"]) == (64, 48, 2)
        assert r["floor_ratio"] == pytest.approx(r["seconds"] / (5 * r["matmul_seconds"]))


def test_predictions_count_the_rows_each_implementation_computes():
    def total(tokens: int, name: str) -> float:
        return next(p.total_s for p in cost.predict_all(cost.Shape(tokens, gpu_check.VOCAB, gpu_check.HIDDEN), H100)
                    if p.name == name)

    assert gpu_check.predicted_rows("fdpo-torch", "logprobs", 4096) == 3584
    assert gpu_check.predicted_rows("naive", "logprobs", 4096) == 4096
    assert gpu_check.predicted_rows("liger", "logprobs", 4096) == 4096
    assert gpu_check.predicted_rows("cce", "tdpo", 16384) == gpu_check.predicted_rows("trl", "dpo-reverse_kl",
                                                                                      16384) == 12288
    assert gpu_check.predicted_seconds("fdpo-torch", "logprobs", 4096, H100) == pytest.approx(total(3584, "fdpo-torch"))
    assert gpu_check.predicted_seconds("naive", "logprobs", 4096, H100) == pytest.approx(total(4096, "naive"))
    assert gpu_check.matmul_seconds("logprobs", 4096, H100) == pytest.approx(
        cost.floor_seconds(cost.Shape(3584, gpu_check.VOCAB, gpu_check.HIDDEN), H100) / 4)
    records = [gpu_check.blank_record("tdpo", 4096, "fdpo-triton", "ok", None) | {"seconds": 0.1},
               gpu_check.blank_record("tdpo", 4096, "naive", "ok", None) | {"seconds": 0.1}]
    gpu_check.add_predictions(records, H100)
    assert [(r["tokens"], r["scored_tokens"], r["predicted_tokens"]) for r in records] == [(4096, 3072, 3072),
                                                                                           (4096, 3072, 4096)]

"""The cost model (fdpo.cost) and its report (benchmarks.model): figures, chooser, buffer rows, CLI.

The strategy chooser is checked against the model's own predictions: over a grid of shapes,
dtypes, devices and budgets it must pick the strategy with the lower predicted backward time among
those whose buffer fits the budget.
"""

import itertools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks import model
from fdpo import cost

REPO = Path(__file__).resolve().parents[1]
BIG = dict(tokens=16384, vocab=128256, hidden=4096)
GIB = 1024**3


def test_atomic_payload_of_the_issue() -> None:
    """537 GB at N = 16k, V = 128k (Llama 3's 128256), D = 4096, 128 x 128 tiles, fp32 adds."""
    payload = cost.atomic_payload_bytes(16384, 128256, 4096, block_n=128, block_v=128, accumulator_bytes=4)
    assert payload == pytest.approx(537e9, rel=0.01)
    assert payload == 16384 * 128256 * 4096 * 4 * 2 // 128
    # With V = 2^17 the payload is exactly 2^39 bytes (512 GiB, 550 GB).
    assert cost.atomic_payload_bytes(16384, 131072, 4096) == 2**39


def test_four_matmul_floor_flops() -> None:
    assert cost.floor_flops(16384, 131072, 4096) == 8 * 16384 * 131072 * 4096 == 2**46
    assert cost.floor_flops(16384, 131072, 4096) / 4 == pytest.approx(17.59e12, rel=1e-3)
    assert cost.floor_flops(**BIG) == 68_856_915_689_472
    assert cost.Shape(**BIG).matmul_flops() * 4 == cost.floor_flops(**BIG)


def test_predicted_floor_on_h100_is_about_90_ms() -> None:
    """The issue's estimate: 4 matmuls of 17 TFLOP take about 90 ms at H100 bf16 rates."""
    assert 80e-3 < cost.floor_seconds(cost.Shape(**BIG), "h100") < 100e-3


@pytest.mark.parametrize("name, expected", [
    ("h100", cost.H100_SXM), ("H100", cost.H100_SXM), ("NVIDIA H100 80GB HBM3", cost.H100_SXM),
    ("a100", cost.A100_SXM_80GB), ("NVIDIA A100-SXM4-80GB", cost.A100_SXM_80GB),
    ("h200", cost.H200_SXM), ("NVIDIA H200", cost.H200_SXM),
])
def test_device_names(name: str, expected: cost.DeviceSpec) -> None:
    assert cost.device_spec(name) is expected
    assert cost.device_spec(expected) is expected


# The PCIe H200 NVL and MIG slices of the known GPUs carry the names of the known parts but not their figures.
@pytest.mark.parametrize("device", ["v100", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-40GB", "NVIDIA GH200 480GB", "",
                                    "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA H100 80GB HBM3 MIG 1g.10gb",
                                    "NVIDIA A100-SXM4-80GB MIG 1g.10gb", "NVIDIA H200 MIG 1g.18gb",
                                    torch.device("cpu")])
def test_unknown_device_raises_listing_the_known_ones(device: object) -> None:
    with pytest.raises(ValueError, match=r"\['a100', 'h100', 'h200'\]"):
        cost.device_spec(device)
    with pytest.raises(ValueError):
        cost.choose_backward(1024, 32000, 1024, torch.bfloat16, device)


def test_split_rows_respects_the_budget_and_is_monotone() -> None:
    for vocab, dtype in itertools.product([32000, 128256, 151936], [torch.bfloat16, torch.float32]):
        previous = 0
        for budget in range(0, 3 * GIB, 37 * 1024**2 + 11):
            rows = cost.split_rows(vocab, dtype, budget)
            assert rows * vocab * dtype.itemsize <= budget
            whole = rows >= cost.SPLIT_ROW_MULTIPLE      # whole row tiles, or every row that fits
            assert rows % cost.SPLIT_ROW_MULTIPLE == 0 if whole else (rows + 1) * vocab * dtype.itemsize > budget
            assert rows >= previous
            assert (rows + cost.SPLIT_ROW_MULTIPLE) * vocab * dtype.itemsize > budget   # the most that fit
            previous = rows
    assert cost.split_rows(128256, torch.bfloat16, cost.DEFAULT_BACKWARD_BUFFER_BYTES) == 4096
    assert cost.split_rows(128256, torch.bfloat16, 0) == 0
    assert cost.split_rows(128256, torch.bfloat16, 2 * 128256 * 2 - 1) == 1      # below one tile: every row
    with pytest.raises(ValueError):
        cost.split_rows(128256, torch.bfloat16, -1)


def test_chooser_picks_fused_without_a_buffer() -> None:
    for device in cost.DEVICES:
        assert cost.choose_backward(**BIG, dtype=torch.bfloat16, device=device, buffer_bytes=0) == "fused"
    with pytest.raises(ValueError, match="holds no"):
        cost.predict_backward("split", cost.Shape(**BIG), "h100", buffer_bytes=0)


@pytest.mark.parametrize("tokens, vocab, hidden", [(256, 32000, 512), (512, 128256, 4096), (1, 50, 8)])
def test_chooser_picks_fused_for_small_shapes(tokens: int, vocab: int, hidden: int) -> None:
    for device in cost.DEVICES:
        assert cost.choose_backward(tokens, vocab, hidden, torch.bfloat16, device) == "fused"


def test_chooser_picks_split_at_the_target_shape() -> None:
    assert cost.choose_backward(**BIG, dtype=torch.bfloat16, device="h100") == "split"
    fused_s, _ = cost.predict_backward("fused", cost.Shape(**BIG), "h100")
    split_s, _ = cost.predict_backward("split", cost.Shape(**BIG), "h100")
    assert split_s < fused_s


def test_chooser_agrees_with_the_predictions() -> None:
    """Over a grid: the candidate with the lowest predicted backward time, among fused and (when its
    buffer fits the budget and holds MIN_SPLIT_ROWS rows) split."""
    budgets = [0, 64 * 1024**2, 256 * 1024**2, cost.DEFAULT_BACKWARD_BUFFER_BYTES, 8 * GIB]
    picked = set()
    for device, tokens, vocab, hidden, dtype, budget in itertools.product(
            cost.DEVICES, [512, 2048, 16384], [32000, 128256], [1024, 4096], [torch.bfloat16, torch.float32],
            budgets):
        shape = cost.Shape(tokens, vocab, hidden, dtype)
        times = {"fused": cost.predict_backward("fused", shape, device)[0]}
        rows = min(cost.split_rows(vocab, dtype, budget), tokens)
        if rows >= cost.MIN_SPLIT_ROWS:
            seconds, scratch = cost.predict_backward("split", shape, device, budget)
            buffer = scratch - 4 * (tokens + vocab) * hidden          # beyond the fp32 dH, dW both hold
            assert buffer == rows * vocab * dtype.itemsize <= budget
            times["split"] = seconds
        expected = min(times, key=times.__getitem__)
        choice = cost.choose_backward(tokens, vocab, hidden, dtype, device, budget)
        assert choice == expected, (device, shape, budget, times)
        picked.add(choice)
    assert picked == {"fused", "split"}


def test_predictions_are_positive_and_name_every_peer() -> None:
    for device in cost.DEVICES:
        predictions = cost.predict_all(cost.Shape(**BIG), device)
        assert [p.name for p in predictions] == [
            "fdpo-fused", "fdpo-split", "fdpo-torch", "naive", "trl", "liger", "cce-exact", "cce"]
        for p in predictions:
            assert p.forward_s > 0 and p.backward_s > 0 and p.scratch_bytes > 0, p
        by_name = {p.name: p for p in predictions}
        assert by_name["naive"].scratch_bytes >= 12 * BIG["tokens"] * BIG["vocab"]
        assert by_name["cce"].total_s == by_name["cce-exact"].total_s     # exact is the filtered one's upper bound


@pytest.fixture
def fp32_precision() -> Iterator[None]:
    """Restores torch's float32 matmul precision after a test that sets it."""
    saved = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(saved)


def test_float32_matmul_rate_follows_the_float32_matmul_precision(fp32_precision: None) -> None:
    """fdpo's kernels and torch's GEMMs multiply float32 in TF32 unless the precision is "highest":
    the float32 rate is the TF32 peak then, read from torch when the prediction is made, or the
    setting given explicitly; 16-bit heads are on the tensor cores whatever it is."""
    for spec in cost.DEVICES.values():
        assert spec.tf32_flops > 5 * spec.fp32_flops
        for setting, expected in (("highest", spec.fp32_flops), ("high", spec.tf32_flops), ("medium", spec.tf32_flops)):
            torch.set_float32_matmul_precision(setting)
            assert cost.matmul_flops_per_s(spec, torch.float32) == expected
            assert cost.matmul_flops_per_s(spec, torch.bfloat16) == spec.bf16_flops
            for other in cost.FP32_PRECISIONS:
                explicit = spec.fp32_flops if other == "highest" else spec.tf32_flops
                assert cost.matmul_flops_per_s(spec, torch.float32, other) == explicit
    with pytest.raises(ValueError, match="fp32_precision must be"):
        cost.matmul_flops_per_s(cost.A100_SXM_80GB, torch.float32, "tf32")


def test_float32_predictions_and_choice_follow_the_float32_matmul_precision(fp32_precision: None) -> None:
    """At N = 1024, V = 32000, D = 1024 in float32 on an A100 the fused backward is predicted faster
    on the FP32 units and the split on TF32: auto's choice follows torch's setting at the time of
    the call, and `fp32_precision` predicts for a setting other than the current one."""
    shape, args = cost.Shape(1024, 32000, 1024, torch.float32), (1024, 32000, 1024, torch.float32, "a100")
    torch.set_float32_matmul_precision("highest")
    assert cost.choose_backward(*args) == "fused"
    assert cost.choose_backward(*args, fp32_precision="high") == "split"
    highest = {p.name: p.total_s for p in cost.predict_all(shape, "a100")}
    torch.set_float32_matmul_precision("high")
    assert cost.choose_backward(*args) == "split"
    assert cost.choose_backward(*args, fp32_precision="highest") == "fused"
    high = {p.name: p.total_s for p in cost.predict_all(shape, "a100")}
    assert high == {p.name: p.total_s for p in cost.predict_all(shape, "a100", fp32_precision="high")}
    assert highest == {p.name: p.total_s for p in cost.predict_all(shape, "a100", fp32_precision="highest")}
    assert all(high[name] < highest[name] for name in high)
    assert cost.floor_seconds(shape, "a100") < cost.floor_seconds(shape, "a100", fp32_precision="highest")
    bf16 = cost.Shape(1024, 32000, 1024, torch.bfloat16)
    assert cost.predict_all(bf16, "a100") == cost.predict_all(bf16, "a100", fp32_precision="highest")


def test_cli_predicts_float32_at_the_given_or_current_precision(capsys: pytest.CaptureFixture,
                                                                 fp32_precision: None) -> None:
    argv = ["--tokens", "1024", "--vocab", "32000", "--hidden", "1024", "--device", "a100", "--dtype", "float32"]
    highest = run_cli([*argv, "--fp32-precision", "highest"], capsys)
    high = run_cli([*argv, "--fp32-precision", "high"], capsys)
    assert "float32 matmul precision 'highest': matmuls on the FP32 units" in highest.splitlines()[0]
    assert "float32 matmul precision 'high': matmuls on the TF32 tensor cores" in high.splitlines()[0]
    assert "auto picks (from the predictions): fused " in highest
    assert "auto picks (from the predictions): split " in high
    torch.set_float32_matmul_precision("high")
    assert run_cli(argv, capsys) == high
    torch.set_float32_matmul_precision("highest")
    assert run_cli(argv, capsys) == highest


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    text = model.main(argv)
    assert capsys.readouterr().out.strip() == text.strip()
    return text


def test_cli_prints_the_predicted_table(capsys: pytest.CaptureFixture) -> None:
    text = run_cli(["--tokens", "16384", "--vocab", "128256", "--hidden", "4096", "--device", "h100"], capsys)
    assert text.startswith("Predicted")
    header = next(line for line in text.splitlines() if line.startswith("| implementation"))
    assert all("predicted" in column for column in header.strip("|").split("|")[1:-1])
    rows = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert {"fdpo-fused", "fdpo-split", "fdpo-torch", "naive", "trl", "liger", "cce-exact", "cce"} <= rows
    assert re.search(r"^auto picks \(from the predictions\): split ", text, re.MULTILINE)


def test_cli_without_buffer_picks_fused(capsys: pytest.CaptureFixture) -> None:
    text = run_cli(["--tokens", "4096", "--vocab", "32000", "--hidden", "2048", "--device", "NVIDIA H200",
                    "--dtype", "float32", "--buffer-bytes", "0"], capsys)
    assert "fdpo-split" not in text
    assert "auto picks (from the predictions): fused " in text


@pytest.mark.parametrize("argv", [
    ["--tokens", "0", "--vocab", "32000", "--hidden", "64"],
    ["--tokens", "8", "--vocab", "32000", "--hidden", "64", "--device", "v100"],
    ["--tokens", "8", "--vocab", "32000", "--hidden", "64", "--buffer-bytes", "-1"],
    ["--tokens", "8", "--vocab", "32000", "--hidden", "64", "--dtype", "int8"],
    ["--tokens", "8", "--vocab", "32000", "--hidden", "64", "--fp32-precision", "tf32"],
    ["--vocab", "32000", "--hidden", "64"],
])
def test_cli_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        model.main(argv)
    assert stopped.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_readme_quotes_the_current_prediction() -> None:
    """README's predicted fdpo and TRL times at N = 16384, V = 128256, D = 4096, bf16, H100 are the model's."""
    by_name = {p.name: p for p in cost.predict_all(cost.Shape(**BIG), "h100")}
    chosen = cost.choose_backward(**BIG, dtype=torch.bfloat16, device="h100")
    paragraphs = [" ".join(p.split()) for p in (REPO / "README.md").read_text(encoding="utf-8").split("\n\n")]
    line = next(p for p in paragraphs if "benchmarks.model" in p and "predicted" in p.lower())
    assert f"{by_name['fdpo-' + chosen].total_s * 1e3:.0f} ms" in line
    assert f"{by_name['trl'].total_s * 1e3:.0f} ms" in line

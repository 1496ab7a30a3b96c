"""`python -m benchmarks.gpu_check` without a GPU: the dry-run plan, the one-line refusal, the
measured / predicted table, the budget sizing, the deadline of the slice and the argument errors."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import gpu_check
from fdpo import cost

REPO = Path(__file__).resolve().parents[1]
H100 = cost.DEVICES["h100"]


def test_dry_run_prints_every_shape_implementation_and_prediction(capsys):
    assert gpu_check.main(["--dry-run", "--device-model", "h100"]) == 0
    out = capsys.readouterr().out
    assert "predicted" in out and "H100-SXM5-80GB" in out and "budget 480 s" in out
    for step in ("step 1/4", "step 2/4", "step 3/4", "step 4/4"):
        assert step in out
    assert "pytest -q -p no:cacheprovider" in out and "tests/test_logprobs.py" in out and " -x " not in out
    for workload in gpu_check.WORKLOADS:
        for tokens in gpu_check.TOKENS:
            for name in gpu_check.IMPLEMENTATIONS:
                predicted = gpu_check.predicted_seconds(name, workload, tokens, H100)
                shown = "-" if predicted is None else f"{predicted * 1e3:.1f}"
                assert f"| {workload} | {tokens} | {name} | {shown} |" in out
    triton = gpu_check.predicted_seconds("fdpo-triton", "logprobs", 16384, H100)
    assert triton == pytest.approx(sum(p.total_s for p in cost.predict_all(
        cost.Shape(14336, 128256, 4096), H100) if p.name == "fdpo-split")), "at the 7/8 scored tokens"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_the_command_refuses_in_one_line():
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode != 0
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1
    assert "needs a CUDA GPU" in done.stderr and "--dry-run" in done.stderr


def synthetic_records() -> list[dict]:
    ok = gpu_check.blank_record("logprobs", 4096, "fdpo-triton", "ok", None) | {
        "seconds": 0.054, "peak_bytes": 3 * 2**20, "floor_ratio": 1.5}
    naive = gpu_check.blank_record("logprobs", 4096, "naive+compile", "ok", None) | {
        "seconds": 0.030, "peak_bytes": 2**30, "floor_ratio": 1.2}
    wrong = gpu_check.blank_record("tdpo", 16384, "fdpo-torch", "wrong", "value differs")
    missing = gpu_check.blank_record("tdpo", 16384, "trl", "unavailable", "not installed (trl)")
    return [ok, naive, wrong, missing]


def test_table_of_measured_and_predicted():
    records = synthetic_records()
    gpu_check.add_predictions(records, H100)
    ok, naive, wrong, missing = records
    predicted = gpu_check.predicted_seconds("fdpo-triton", "logprobs", 4096, H100)
    assert ok["predicted_seconds"] == predicted
    assert ok["measured_vs_predicted"] == pytest.approx(0.054 / predicted)
    assert naive["predicted_seconds"] is None and naive["measured_vs_predicted"] is None
    assert wrong["predicted_seconds"] is not None and wrong["measured_vs_predicted"] is None
    assert missing["predicted_seconds"] is None, "trl does not implement tdpo: nothing to predict"

    lines = gpu_check.comparison_table(records).splitlines()
    assert lines[0].startswith("| workload | N | implementation | measured ms | predicted ms | measured / predicted")
    assert len(lines) == 2 + len(records)
    assert lines[2] == (f"| logprobs | 4096 | fdpo-triton | 54.0 | {predicted * 1e3:.1f} | "
                        f"{0.054 / predicted:.2f} | 3.0 | 1.50 | ok |")
    assert lines[3] == "| logprobs | 4096 | naive+compile | 30.0 | - | - | 1024.0 | 1.20 | ok |"
    assert lines[4].endswith("| - | - | wrong: value differs |")
    assert lines[5].endswith("| unavailable: not installed (trl) |")

    gpu_check.add_predictions(records, None)
    assert all(r["predicted_seconds"] is None and r["measured_vs_predicted"] is None for r in records)


@pytest.mark.parametrize("budget", [0.0, 5.0, 30.0, 60.0, 120.0, 250.0, 400.0, 2000.0])
@pytest.mark.parametrize("device", ["a100", "h100", "h200"])
def test_plan_never_predicts_more_than_the_budget(budget, device):
    spec = cost.DEVICES[device]
    available = gpu_check.availability()
    plan = gpu_check.make_plan(budget, spec, available)
    assert plan.predicted_s <= budget
    assert (plan.warmup, plan.repeats) in gpu_check.REPEAT_PLANS
    planned = {(s.workload, s.tokens) for s in plan.shapes}
    skipped = {(s["workload"], s["tokens"]) for s in plan.skipped}
    assert planned | skipped == {(w, n) for w in gpu_check.WORKLOADS for n in gpu_check.TOKENS}
    assert not planned & skipped
    assert all(s["reason"].startswith("predicted") for s in plan.skipped)
    for shape in plan.shapes:
        assert shape.impls[0] == "naive"
        for name in gpu_check.IMPLEMENTATIONS:
            assert [name in shape.impls, name in shape.unavailable, name in shape.dropped].count(True) == 1, name
            assert shape.unavailable.get(name) == available[name][shape.workload]


def test_plan_covers_every_row_before_it_adds_repeats():
    available = gpu_check.availability()
    small, medium, large = (gpu_check.make_plan(b, H100, available) for b in (60.0, 250.0, 2000.0))
    assert not large.skipped and (large.warmup, large.repeats) == gpu_check.REPEAT_PLANS[0]
    assert len(small.shapes) < len(large.shapes)
    assert (small.warmup, small.repeats) == gpu_check.REPEAT_PLANS[-1]
    assert not medium.skipped and not any(s.dropped for s in medium.shapes)
    assert gpu_check.REPEAT_PLANS.index((medium.warmup, medium.repeats)) > 0, "fewer rounds, every row kept"


def test_pytest_summary():
    assert gpu_check.pytest_summary("....\n12 passed, 1 failed, 3 skipped in 4.20s\n") == {
        "passed": 12, "failed": 1, "skipped": 3}
    assert gpu_check.pytest_summary("x\n1 failed, 2 passed, 1 error in 0.5s\n") == {
        "failed": 1, "passed": 2, "error": 1}
    assert gpu_check.pytest_summary("no summary") == {}


def fake_measure(args, runner, shape, dtype, device, sink=None):
    return [gpu_check.blank_record(shape["workload"], shape["tokens"], name, "ok", None) | {"seconds": 0.01}
            for name in args.impls]


def slice_args(plan, tmp_path):
    return cli.parse_args(gpu_check.slice_argv(["naive", "fdpo-torch"], plan, tmp_path, device="cpu"))


def test_slice_measures_what_fits_and_skips_the_rest_with_reasons(tmp_path):
    fits = gpu_check.ShapePlan("logprobs", 4096, ["naive", "fdpo-torch"], {"trl": "not installed (trl)"},
                               {"cce": "does not fit"}, 1.0, 0.1)
    too_long = gpu_check.ShapePlan("tdpo", 16384, ["naive", "fdpo-torch"], {}, {}, 1e4, 1.0)
    plan = gpu_check.Plan(100.0, [fits, too_long], 1, 3,
                          [{"workload": "dpo-reverse_kl", "tokens": 4096, "reason": "predicted 9 s, 1 s left"}])
    records = gpu_check.run_slice(slice_args(plan, tmp_path), plan, gpu_check.Clock(100.0), measure=fake_measure)
    by_key = {(r["workload"], r["tokens"], r["implementation"]): r for r in records}
    assert by_key["logprobs", 4096, "naive"]["status"] == "ok"
    assert (by_key["logprobs", 4096, "trl"]["status"], by_key["logprobs", 4096, "trl"]["reason"]) == (
        "unavailable", "not installed (trl)")
    assert (by_key["logprobs", 4096, "cce"]["status"], by_key["logprobs", 4096, "cce"]["reason"]) == (
        "skipped", "does not fit")
    assert by_key["tdpo", 16384, "fdpo-torch"]["status"] == "skipped"
    assert "s left when its turn came" in by_key["tdpo", 16384, "fdpo-torch"]["reason"]
    available = gpu_check.availability()
    for name in gpu_check.IMPLEMENTATIONS:
        record = by_key["dpo-reverse_kl", 4096, name]
        assert record["reason"] == (available[name]["dpo-reverse_kl"] or "predicted 9 s, 1 s left")


def test_slice_stops_at_the_deadline(tmp_path):
    def slow_measure(*args, **kwargs):
        time.sleep(5)
        raise AssertionError("the alarm stops the measurement first")

    shape = gpu_check.ShapePlan("logprobs", 4096, ["naive", "fdpo-torch"], {}, {}, 0.0, 0.0)
    plan = gpu_check.Plan(1.0, [shape], 0, 1, [])
    started = time.monotonic()
    records = gpu_check.run_slice(slice_args(plan, tmp_path), plan, gpu_check.Clock(gpu_check.OUTPUT_RESERVE_S + 0.3),
                                  measure=slow_measure)
    assert time.monotonic() - started < 3
    assert [(r["implementation"], r["status"], r["reason"]) for r in records] == [
        ("naive", "skipped", "stopped: the budget ran out"), ("fdpo-torch", "skipped", "stopped: the budget ran out")]


@pytest.mark.parametrize(("argv", "message"), [
    (["--budget-seconds", "-5"], "--budget-seconds: must be a positive number of seconds, got -5"),
    (["--budget-seconds", "soon"], "--budget-seconds: invalid positive_float value: 'soon'"),
    (["--pytest-timeout", "0"], "--pytest-timeout: must be a positive number of seconds, got 0"),
    (["--device-model", "tpu"], "--device-model: no cost model for device 'tpu'"),
    (["--tokens", "8"], "unrecognized arguments: --tokens 8"),
])
def test_argument_errors_are_clear(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", ["NVIDIA H200 NVL", "NVIDIA H100 80GB HBM3 MIG 1g.10gb",
                                  "NVIDIA A100-SXM4-80GB MIG 1g.10gb", "NVIDIA H100 PCIe"])
def test_gpus_without_figures_get_no_predictions(name, monkeypatch, capsys):
    """A GPU the cost model refuses (the H200 NVL and MIG slices as the PCIe H100) has no device model:
    no predictions in the table (`add_predictions`), and --device-model names the refusal."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert gpu_check.gpu_model() is None
    records = [gpu_check.blank_record("logprobs", 4096, "fdpo-triton", "ok", None) | {"seconds": 0.1}]
    gpu_check.add_predictions(records, gpu_check.gpu_model())
    assert records[0]["predicted_seconds"] is None and records[0]["measured_vs_predicted"] is None
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device-model", name])
    assert f"--device-model: no cost model for device {name!r}" in capsys.readouterr().err


def test_the_check_fails_with_a_message_when_no_fdpo_kernel_was_measured():
    passed = {"status": "passed"}
    ok = [gpu_check.blank_record("logprobs", 4096, "naive", "ok", None),
          gpu_check.blank_record("logprobs", 4096, "fdpo-triton-split", "ok", None)]
    assert gpu_check.failures(passed, ok) == []
    skipped = [gpu_check.blank_record("logprobs", 4096, "naive", "ok", None),
               gpu_check.blank_record("logprobs", 4096, "fdpo-triton", "skipped", "stopped: the budget ran out"),
               gpu_check.blank_record("tdpo", 4096, "fdpo-triton-fused", "out of memory", None)]
    [message] = gpu_check.failures(passed, skipped)
    assert "no fdpo-triton implementation was measured" in message
    failed = gpu_check.failures({"status": "failed"}, [*ok, gpu_check.blank_record("tdpo", 4096, "fdpo-torch",
                                                                                     "wrong", "value differs")])
    assert len(failed) == 2 and "kernel tests: failed" in failed[0] and "fdpo-torch on tdpo N=4096: wrong" in failed[1]


def test_the_plan_counts_the_second_check_of_the_drift_checked_workloads():
    one = gpu_check.reference_seconds("logprobs", 4096, H100)
    assert gpu_check.checks("logprobs") == 1 and gpu_check.checks("tdpo") == gpu_check.checks("dpo-reverse_kl") == 2
    tdpo = gpu_check.reference_seconds("tdpo", 4096, H100)
    matmuls = 2 * 4096 * gpu_check.VOCAB * gpu_check.HIDDEN / (H100.fp32_flops * cost.GEMM_EFFICIENCY)
    assert tdpo > 2 * gpu_check.REFERENCE_MATMULS["tdpo"] * matmuls > one
    shape = gpu_check._shape_plan("tdpo", 4096, ["naive"], {"naive": {"tdpo": None}}, {}, H100, set())
    naive = gpu_check.planning_seconds("naive", "tdpo", 4096, H100)
    assert shape.fixed_s == pytest.approx(tdpo + 3 * naive + 2 * gpu_check.comparison_seconds(4096, H100)
                                          + gpu_check.free_memory_seconds(1)), "two checks and the memory call"


# ---- the float64 expected results, the deadline, the kernel tests and the output -------------------

class Marker:
    """Stands for a float64 expected tensor: `.cpu()` returns a moved copy, which the check must not get."""

    def __init__(self, where):
        self.where = where

    def cpu(self):
        return Marker("cpu")


def test_expected_results_stay_where_they_were_computed_and_records_reach_the_sink(monkeypatch):
    """The float64 references are compared on the device they were computed on (on a GPU, the GPU: no
    copy to the host), and measure_shape hands its records to `sink` before measuring, filled in place."""
    class Inputs:
        def reset_grads(self):
            pass

    seen = []

    class Runner:
        def check_and_peak(self, name, inputs, expected, allowed, drift_check=None):
            seen.append(expected)
            assert sink[0]["status"] == ("not run" if name == "naive" else "wrong"), "filled in place, in turn"
            return {"status": "wrong", "reason": "value differs", "errors": {"value": 1.0}}

    monkeypatch.setattr(cli, "make_inputs", lambda *args, **kwargs: Inputs())
    monkeypatch.setattr(cli, "float64_reference", lambda inputs: (Marker("device"), Marker("device")))
    monkeypatch.setattr(cli, "allowed_error", lambda inputs: 0.1)
    monkeypatch.setattr(cli, "matmul_call", lambda *args, **kwargs: lambda: None)
    monkeypatch.setattr(cli, "median_seconds", lambda calls, *args, **kwargs: {"matmul": 0.01})
    args = cli.parse_args(["--device", "cpu", "--impls", "naive", "fdpo-torch", "--tokens", "64"])
    shape = {"workload": "logprobs", "tokens": 64, "vocab": 32, "hidden": 8, "dtype": "float32"}
    sink = []
    records = cli.measure_shape(args, Runner(), shape, torch.float32, torch.device("cpu"), sink=sink)
    assert [e.where for expected in seen for e in expected] == ["device"] * 4
    assert [r["status"] for r in records] == ["wrong", "wrong"] and all(
        a is b for a, b in zip(records, sink, strict=True))


def test_the_plan_runs_the_largest_n_first():
    for budget in (150.0, 310.0, 2000.0):
        plan = gpu_check.make_plan(budget, cost.DEVICES["h200"], gpu_check.availability())
        tokens = [shape.tokens for shape in plan.shapes]
        assert tokens and tokens[0] == max(gpu_check.TOKENS) and tokens == sorted(tokens, reverse=True)


def test_a_shape_cut_by_the_deadline_keeps_what_it_measured(tmp_path):
    def cut_measure(args, runner, shape, dtype, device, sink=None):
        checked = gpu_check.blank_record(shape["workload"], shape["tokens"], "naive", "ok", None) | {
            "errors": {"value": 1e-4}, "peak_bytes": 2**30}
        wrong = gpu_check.blank_record(shape["workload"], shape["tokens"], "fdpo-torch", "wrong", "value differs")
        waiting = gpu_check.blank_record(shape["workload"], shape["tokens"], "fdpo-triton", "not run", None)
        sink.extend([checked, wrong, waiting])
        time.sleep(5)
        raise AssertionError("the alarm stops the measurement first")

    shape = gpu_check.ShapePlan("logprobs", 16384, ["naive", "fdpo-torch", "fdpo-triton"], {"trl": "absent"},
                                {"cce": "does not fit"}, 0.0, 0.0)
    plan = gpu_check.Plan(1.0, [shape], 0, 1, [])
    records = gpu_check.run_slice(slice_args(plan, tmp_path), plan, gpu_check.Clock(gpu_check.OUTPUT_RESERVE_S + 0.3),
                                  measure=cut_measure)
    by_name = {r["implementation"]: r for r in records}
    assert by_name["naive"]["status"] == "skipped" and "before it was timed" in by_name["naive"]["reason"]
    assert by_name["naive"]["peak_bytes"] == 2**30 and by_name["naive"]["errors"] == {"value": 1e-4}
    assert (by_name["fdpo-torch"]["status"], by_name["fdpo-torch"]["reason"]) == ("wrong", "value differs")
    assert (by_name["fdpo-triton"]["status"], by_name["fdpo-triton"]["reason"]) == (
        "skipped", "stopped: the budget ran out")
    assert (by_name["trl"]["status"], by_name["cce"]["status"]) == ("unavailable", "skipped")
    assert len(records) == 5


class FakeClock(gpu_check.Clock):
    """A clock that the fake measurements move forward."""

    def __init__(self, budget_s):
        super().__init__(budget_s)
        self.now = 0.0

    def elapsed(self):
        return self.now


def test_predictions_are_rescaled_by_measured_over_predicted(tmp_path):
    """Shape A is predicted 10 s and takes 30: B (3 s a round: 39 s at warm-up 3 + 10 repeats, 117 s
    rescaled) runs with the most rounds that fit the 70 s left (1 + 5: 18 s, 54 s rescaled); C (10 s,
    30 s rescaled) no longer fits the 16 s left and is skipped with the reason."""
    clock = FakeClock(100.0 + gpu_check.OUTPUT_RESERVE_S)
    ran = []

    def slow_measure(args, runner, shape, dtype, device, sink=None):
        ran.append((shape["workload"], args.warmup, args.repeats))
        clock.now += 30.0 if shape["workload"] == "logprobs" else 54.0
        return fake_measure(args, runner, shape, dtype, device)

    a = gpu_check.ShapePlan("logprobs", 16384, ["naive"], {}, {}, 10.0, 0.0)
    b = gpu_check.ShapePlan("dpo-reverse_kl", 16384, ["naive"], {}, {}, 0.0, 3.0)
    c = gpu_check.ShapePlan("tdpo", 16384, ["naive"], {}, {}, 10.0, 0.0)
    plan = gpu_check.Plan(100.0, [a, b, c], 3, 10, [])
    records = gpu_check.run_slice(slice_args(plan, tmp_path), plan, clock, measure=slow_measure)
    assert ran == [("logprobs", 3, 10), ("dpo-reverse_kl", 1, 5)]
    [skipped] = [r for r in records if r["workload"] == "tdpo"]
    assert skipped["status"] == "skipped" and "rescaled by measured / predicted 3.00" in skipped["reason"]


def kernel_tests_on(source, tmp_path, monkeypatch):
    path = tmp_path / "test_kernels_here.py"
    path.write_text(source)
    monkeypatch.setattr(gpu_check, "kernel_test_files", lambda: ([str(path)], []))


def test_kernel_tests_run_past_the_first_failure(tmp_path, monkeypatch):
    kernel_tests_on("def test_a():\n    pass\n\ndef test_b():\n    assert False\n\ndef test_c():\n    pass\n",
                    tmp_path, monkeypatch)
    result = gpu_check.run_kernel_tests(60.0)
    assert result["status"] == "failed" and result["counts"] == {"passed": 2, "failed": 1}
    assert " -x " not in result["command"]


def test_a_timed_out_kernel_test_run_reports_its_counts(tmp_path, monkeypatch):
    kernel_tests_on("import time\n\ndef test_a():\n    pass\n\ndef test_b():\n    pass\n\n"
                    "def test_slow():\n    time.sleep(60)\n", tmp_path, monkeypatch)
    started = time.monotonic()
    result = gpu_check.run_kernel_tests(8.0)
    assert time.monotonic() - started < 9.5, "within the overall timeout"
    assert result["status"] == "timed out after 8 s" and result["counts"].get("passed") == 2
    assert gpu_check.progress_counts("..F.s  [ 50%]\nE.\nnot progress\n") == {
        "passed": 4, "failed": 1, "skipped": 1, "error": 1}


def test_kernel_test_command_uses_xdist_and_pytest_timeout_where_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name in ("xdist", "pytest_timeout")
                        else real(name))
    assert gpu_check.kernel_test_command(["t.py"]) == ["-q", "-p", "no:cacheprovider", "t.py"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(gpu_check.os, "cpu_count", lambda: 16)
    assert gpu_check.kernel_test_command(["t.py"]) == ["-q", "-p", "no:cacheprovider", "-n", "8", "--timeout", "60",
                                                       "t.py"]


def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(gpu_check, "device_info", lambda device: {"type": "cuda", "name": "NVIDIA H200"})
    monkeypatch.setattr(gpu_check, "driver_version", lambda: "580.00")
    monkeypatch.setattr(gpu_check, "run_kernel_tests", lambda timeout_s: {
        "command": "pytest", "files": [], "missing_files": [], "status": "passed", "returncode": 0,
        "counts": {"passed": 3}, "seconds": 1.0, "output_tail": []})


def test_the_json_is_written_after_the_tests_and_each_shape_and_survives_a_plot_failure(tmp_path, monkeypatch):
    fake_cuda(monkeypatch)
    seen = []

    def measure(args, runner, shape, dtype, device, sink=None):
        [path] = tmp_path.glob("*-gpu-check.json")
        report = json.loads(path.read_text())
        assert report["partial"] is True and report["pytest"]["status"] == "passed"
        seen.append(len(report["results"]))
        return fake_measure(args, runner, shape, dtype, device)

    def broken_plot(*args):
        raise RuntimeError("no display")

    monkeypatch.setattr(cli, "measure_shape", measure)
    monkeypatch.setattr(cli, "plot", broken_plot)
    assert gpu_check.main(["--device-model", "h200", "--output-dir", str(tmp_path)]) == 0
    assert seen[0] == 0 and seen == sorted(seen) and seen[-1] > 0, "each shape's records written before the next"
    [path] = tmp_path.glob("*-gpu-check.json")
    report = json.loads(path.read_text())
    assert report["partial"] is False and report["plots"] == []
    assert len(report["results"]) == len(gpu_check.WORKLOADS) * len(gpu_check.TOKENS) * len(gpu_check.IMPLEMENTATIONS)
    assert any("no PNG: RuntimeError: no display" in note for note in report["notes"])


def test_stdout_is_flushed_at_every_line():
    """A run killed before it exits (here os._exit, which flushes nothing) keeps every line it printed."""
    code = ("import os\nfrom benchmarks import gpu_check\n"
            "gpu_check.main(['--dry-run', '--device-model', 'h200'])\nos._exit(0)\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False, env=env)
    assert done.returncode == 0 and "step 4/4" in done.stdout.splitlines()[-1]


def test_a_deadline_as_a_shapes_turn_comes_still_records_it(tmp_path):
    """The deadline rings while the second shape's line is printed (after it left the queue, before
    measuring): its rows are still there, marked stopped, each (workload, N, implementation) once."""

    class RingingClock(gpu_check.Clock):
        def progress(self, message):
            super().progress(message)
            if message.startswith("step 2/4: dpo-reverse_kl"):
                raise gpu_check.DeadlineReached

    shapes = [gpu_check.ShapePlan(workload, 16384, ["naive", "fdpo-torch"], {}, {}, 0.1, 0.0)
              for workload in ("logprobs", "dpo-reverse_kl", "tdpo")]
    plan = gpu_check.Plan(100.0, shapes, 0, 1, [])
    records = gpu_check.run_slice(slice_args(plan, tmp_path), plan, RingingClock(200.0), measure=fake_measure)
    keys = [(r["workload"], r["implementation"]) for r in records]
    assert len(keys) == len(set(keys)) == 6
    cut = [r for r in records if r["workload"] == "dpo-reverse_kl"]
    assert [r["status"] for r in cut] == ["skipped", "skipped"] and all("stopped" in r["reason"] for r in cut)


def test_the_dry_run_table_lists_shapes_in_run_order():
    plan = gpu_check.make_plan(480.0, cost.DEVICES["h200"], gpu_check.availability())
    table = gpu_check.plan_table(plan, cost.DEVICES["h200"], gpu_check.availability())
    rows = [line.split("|")[2].strip() for line in table.splitlines()[2:]]
    assert rows[0] == str(max(gpu_check.TOKENS)) and rows[-1] == str(min(gpu_check.TOKENS))

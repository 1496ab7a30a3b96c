"""The benchmark CLI on tiny shapes: every implementation is listed, checked before it is timed, and the
JSON and plot are written; a wrong implementation is refused; the float64 reference is exact in chunks."""

import json

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import workloads
from benchmarks.workloads import Implementation, tolerance

TINY = ["--quick", "--tokens", "64", "128", "--vocab", "32768", "--hidden", "16", "--repeats", "1", "--warmup", "0",
        "--compile-backend", "aot_eager"]
TINY_WORKLOADS = ("logprobs", "dpo-forward_kl", "tdpo", "epsilon-dpo")
# The peers (compiled with inductor by their own code) are measured in tests/test_peers.py.
OWN = ("naive", "naive+compile", "fdpo-torch", "fdpo-triton")


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_cli_writes_checked_results_and_plot(tmp_path, capsys, restore_threads):
    report = cli.main([*TINY, "--workloads", *TINY_WORKLOADS, "--impls", *OWN, "--threads", "1",
                       "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out

    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    assert saved["device"]["type"] == "cpu" and saved["device"]["torch_threads"] == 1
    assert saved["versions"]["torch"] == torch.__version__
    assert saved["command"].startswith("python -m benchmarks --quick")
    assert len(saved["loadavg_before"]) == len(saved["loadavg_after"]) == 3
    assert saved["check_drift"] == {"drift": workloads.CHECK_DRIFT, "workloads": list(workloads.DRIFT_CHECKED)}

    by_key = {(r["workload"], r["tokens"], r["implementation"]): r for r in report["results"]}
    assert set(by_key) == {(w, n, i) for w in TINY_WORKLOADS for n in (64, 128) for i in OWN}
    for (workload, tokens, name), r in by_key.items():
        assert (r["vocab"], r["hidden"], r["dtype"]) == (32768, 16, "float32")
        if name in ("naive", "naive+compile", "fdpo-torch"):
            assert r["status"] == "ok", r
            assert set(r["errors"]) == {"value", "grad_hidden", "grad_weight"}
            assert max(r["errors"].values()) <= tolerance(workload, torch.float32)
            if workload in workloads.DRIFT_CHECKED:
                assert max(r["drift_errors"].values()) <= tolerance(workload, torch.float32)
            else:
                assert r["drift_errors"] is None
            assert r["seconds"] > 0 and r["peak_bytes"] > 0 and r["matmul_seconds"] > 0
            assert 0 < r["largest_bytes"] <= r["peak_bytes"]
            assert r["floor_ratio"] == pytest.approx(r["seconds"] / (r["floor_matmuls"] * r["matmul_seconds"]))
            naive = by_key[(workload, tokens, "naive")]
            assert r["time_vs_naive"] == pytest.approx(r["seconds"] / naive["seconds"])
            assert r["memory_vs_naive"] == pytest.approx(r["peak_bytes"] / naive["peak_bytes"])
            assert f"| {workload} | 32768 | 16 | {tokens} | {name} |" in out
        else:
            assert name == "fdpo-triton"
            assert r["status"] == "unavailable" and r["reason"] and r["seconds"] is None, r
    for workload in TINY_WORKLOADS:
        for tokens in (64, 128):
            logits = tokens * 32768 * 4
            assert by_key[(workload, tokens, "naive")]["peak_bytes"] >= 2 * logits, "naive holds [N, V] float32 twice"
            assert by_key[(workload, tokens, "naive")]["largest_bytes"] >= logits, "naive allocates [N, V] at once"
            assert by_key[(workload, tokens, "fdpo-torch")]["largest_bytes"] < logits / 2
            assert by_key[(workload, tokens, "fdpo-torch")]["memory_vs_naive"] < 0.5

    plots = [tmp_path / name for name in saved["plots"]]
    assert len(plots) == 1 and plots[0].read_bytes().startswith(b"\x89PNG")


def test_a_wrong_implementation_is_reported_and_not_timed(monkeypatch):
    def off_by_one_percent(**_):
        return workloads._token_impl(lambda h, w, y: workloads.naive_logprobs(h, w, y) * 1.01)

    monkeypatch.setitem(workloads.REGISTRY, "naive+compile", Implementation("naive+compile", "broken",
                                                                             off_by_one_percent))
    args = cli.parse_args([*TINY, "--tokens", "64", "--workloads", "logprobs"])
    shape = {"workload": "logprobs", "tokens": 64, "vocab": 512, "hidden": 16, "dtype": "float32"}
    records = {r["implementation"]: r for r in cli.measure_shape(args, cli.Runner(args, torch.device("cpu")), shape,
                                                                 torch.float32, torch.device("cpu"))}
    wrong = records["naive+compile"]
    assert wrong["status"] == "wrong" and "differs from the float64 reference by 1.00e-02 > 0.001" in wrong["reason"]
    assert wrong["errors"]["value"] == pytest.approx(0.01, rel=1e-3)
    assert wrong["seconds"] is None and wrong["peak_bytes"] is None and wrong["time_vs_naive"] is None
    assert records["naive"]["status"] == records["fdpo-torch"]["status"] == "ok"
    assert records["fdpo-torch"]["seconds"] > 0 and records["fdpo-torch"]["time_vs_naive"] > 0


@pytest.mark.parametrize("workload", ["logprobs", "dpo-forward_kl", "tdpo", "epsilon-dpo"])
def test_float64_reference_in_row_chunks_equals_one_pass(monkeypatch, workload):
    inputs = workloads.make_inputs(workload, 96, 300, 16, dtype=torch.float32, device=torch.device("cpu"))
    whole = workloads.float64_reference(inputs)
    monkeypatch.setattr(workloads, "REFERENCE_CHUNK_BYTES", 8 * 10 * 300 * 5)   # 5 to 16 rows per chunk
    chunked = workloads.float64_reference(inputs)
    for a, b in zip(whole, chunked, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert all(t.abs().max() > 0 for t in whole)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        cli.parse_args(["--tokens", "100", "--pairs", "3", "--workloads", "dpo-js"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--tokens", "0"])
    with pytest.raises(ValueError, match="allowed: logprobs"):
        workloads.make_inputs("dpo-kl", 64, 32, 8, dtype=torch.float32, device=torch.device("cpu"))


def _result_file(path, created: str, records: list[tuple[str, str, float | None, str]]) -> None:
    """A result file of python -m benchmarks with records (implementation, status, time / naive, workload)."""
    results = []
    for name, status, ratio, workload in records:
        ok = status == "ok"
        results.append({"workload": workload, "vocab": 32000, "hidden": 512, "tokens": 1024, "implementation": name,
                        "status": status, "seconds": ratio * 2.0 if ok else None,
                        "time_vs_naive": ratio if ok else None, "peak_bytes": int(ratio * 100 * 2**20) if ok else None,
                        "largest_bytes": 50 * 2**20 if ok else None})
    path.write_text(json.dumps({"created_utc": created, "results": results}))


def test_summary_takes_each_cell_from_its_newest_run_with_that_runs_ratios(tmp_path, capsys):
    from benchmarks import summary

    old, new = tmp_path / "old.json", tmp_path / "new.json"
    _result_file(old, "2026-01-01T00:00:00", [("naive", "ok", 1.0, "logprobs"), ("fdpo-torch", "ok", 0.9, "logprobs"),
                                              ("cce", "ok", 0.7, "logprobs"), ("trl", "ok", 1.8, "logprobs"),
                                              ("naive", "ok", 1.0, "dpo-reverse_kl")])
    _result_file(new, "2026-02-01T00:00:00", [("naive", "ok", 1.0, "logprobs"), ("fdpo-torch", "ok", 0.8, "logprobs"),
                                              ("cce", "unavailable", None, "logprobs"),
                                              ("trl", "wrong", None, "logprobs")])
    png = tmp_path / "summary.png"
    text = summary.main([str(new), str(old), "--png", str(png)])

    assert capsys.readouterr().out.strip() == text
    header, rule, *rows = text.splitlines()
    assert header == ("| workload | device | dtype | V | D | N | P | naive s / MiB (largest) | "
                      "fdpo-torch | cce | trl |")
    assert rule.count("---") == 11
    # The newer run's fdpo-torch and trl status; cce from the older run (the newer marked it unavailable).
    assert rows[0] == ("| logprobs | - | - | 32000 | 512 | 1024 | - | 2 s / 100 (50.0) | 0.80x / 80.0 (50.0) | "
                       "0.70x / 70.0 (50.0) | wrong |")
    assert rows[1] == "| dpo-reverse_kl | - | - | 32000 | 512 | 1024 | - | 2 s / 100 (50.0) | - | - | - |"
    assert png.stat().st_size > 0

    assert summary.main([str(old), "--workloads", "dpo-reverse_kl"]).count("\n") == 2


def test_summary_refuses_other_files(tmp_path):
    from benchmarks import summary

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit):
        summary.main([str(other)])
    empty = tmp_path / "empty.json"
    _result_file(empty, "2026-01-01T00:00:00", [("naive", "unavailable", None, "logprobs")])
    with pytest.raises(SystemExit):
        summary.main([str(empty)])

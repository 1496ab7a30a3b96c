"""`python -m benchmarks.summary` on synthetic result files: a measured record without a naive time in its
run, records that did not run, and runs on other devices, dtypes or pair counts."""

import json

from benchmarks import summary


def record(name: str, status: str = "ok", ratio: float | None = 1.0, seconds: float = 1.0, dtype: str = "float32",
           workload: str = "logprobs") -> dict:
    """A record of `python -m benchmarks` at V = 32000, D = 512, N = 4096 (`ratio`: time / naive)."""
    ok = status == "ok"
    return {"workload": workload, "vocab": 32000, "hidden": 512, "tokens": 4096, "dtype": dtype,
            "implementation": name, "status": status, "reason": None if ok else "why",
            "seconds": seconds if ok else None, "time_vs_naive": ratio if ok else None,
            "peak_bytes": 2**20 if ok else None, "largest_bytes": None}


def write(path, created: str, records: list[dict], device: str = "AMD EPYC", pairs: int = 2) -> str:
    path.write_text(json.dumps({"created_utc": created, "device": {"type": "cpu", "name": device},
                                "settings": {"pairs": pairs}, "results": records}))
    return str(path)


def rows(text: str) -> list[str]:
    return text.splitlines()[2:]


def test_a_record_without_naive_shows_its_time_and_no_point(tmp_path):
    path = write(tmp_path / "a.json", "2026-12-01T00:00:00", [record("naive", "out of memory"),
                                                              record("fdpo-torch", ratio=None, seconds=1.5)])
    png = tmp_path / "a.png"
    text = summary.main([path, "--png", str(png)])
    assert rows(text) == ["| logprobs | AMD EPYC | float32 | 32000 | 512 | 4096 | - | out of memory | "
                          "1.5 s (no naive) / 1.0 |"]
    assert png.read_bytes().startswith(b"\x89PNG")


def test_records_that_did_not_run_hide_no_older_measurement(tmp_path):
    old = write(tmp_path / "old.json", "2026-12-01T00:00:00",
                [record("naive", seconds=2.0), record("fdpo-torch", ratio=0.5, seconds=1.0)])
    new = write(tmp_path / "new.json", "2026-12-02T00:00:00",
                [record("naive", seconds=2.1), record("fdpo-torch", "skipped"), record("cce", "unavailable")])
    assert rows(summary.main([old, new])) == ["| logprobs | AMD EPYC | float32 | 32000 | 512 | 4096 | - | "
                                              "2.1 s / 1.0 | 0.50x / 1.0 |"]


def test_devices_dtypes_and_pairs_are_rows_of_their_own(tmp_path):
    cpu = write(tmp_path / "cpu.json", "2026-12-01T00:00:00",
                [record("naive", seconds=13.8), record("fdpo-torch", ratio=0.9, seconds=12.4),
                 record("naive", seconds=20.0, workload="dpo-reverse_kl")])
    gpu = write(tmp_path / "gpu.json", "2026-12-02T00:00:00", [record("naive", seconds=0.05, dtype="bfloat16")],
                device="NVIDIA H100")
    pairs = write(tmp_path / "pairs.json", "2026-12-03T00:00:00",
                  [record("naive", seconds=21.0, workload="dpo-reverse_kl")], pairs=8)
    assert rows(summary.main([cpu, gpu, pairs])) == [
        "| logprobs | AMD EPYC | float32 | 32000 | 512 | 4096 | - | 13.8 s / 1.0 | 0.90x / 1.0 |",
        "| logprobs | NVIDIA H100 | bfloat16 | 32000 | 512 | 4096 | - | 0.05 s / 1.0 | - |",
        "| dpo-reverse_kl | AMD EPYC | float32 | 32000 | 512 | 4096 | 2 | 20 s / 1.0 | - |",
        "| dpo-reverse_kl | AMD EPYC | float32 | 32000 | 512 | 4096 | 8 | 21 s / 1.0 | - |",
    ]
    assert summary.main([cpu, gpu, pairs, "--png", str(tmp_path / "all.png")]).startswith(
        "| workload | device | dtype | V | D | N | P | naive s / MiB (largest) | fdpo-torch |")

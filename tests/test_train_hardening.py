"""The trainer under faults and misuse: exploding updates, reused output directories, resumes with
other settings, killed runs, crafted and corrupted checkpoints, unloadable models, bad files."""

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import fdpo
from fdpo.train import TrainConfig, Trainer, TrainingError, loop
from fdpo.train import models as train_models
from fdpo.train.adapter import CausalLM
from fdpo.train.checkpoint import MANIFEST, CheckpointError, file_digest, verify_checkpoint, write_checkpoint, writing
from fdpo.train.cli import main
from fdpo.train.config import build_parser
from fdpo.train.data import load_preference_data, read_jsonl
from fdpo.train.models import tiny_llama
from fdpo.train.reference import CachedReference, FrozenReference, frozen_copy, read_cache
from fdpo.train.rundir import MetricsLog, RunDirectoryError, mismatched_fields
from fdpo.train.tokenizer import byte_tokenizer

from train_setup import read_metrics, small_config, write_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


def non_finite(value, name: str = "") -> list[str]:
    """Names of the floating tensors in a nested checkpoint state that hold a NaN or an inf."""
    if isinstance(value, torch.Tensor):
        return [name] if value.is_floating_point() and not torch.isfinite(value).all() else []
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in non_finite(v, f"{name}.{k}")]
    if isinstance(value, (list, tuple)):
        return [n for i, v in enumerate(value) for n in non_finite(v, f"{name}.{i}")]
    return []


def checkpoints(out) -> list:
    root = out / "checkpoints"
    return sorted(p for p in root.iterdir() if p.name.startswith("step-")) if root.is_dir() else []


def tree(out) -> dict[str, int]:
    """Every file under out with its size: a snapshot to prove a refused run wrote nothing."""
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


# -- 1. non-finite updates never reach a checkpoint --------------------------------------------------------------


def test_exploding_updates_stop_before_a_broken_checkpoint(data, tmp_path):
    config = small_config(data, tmp_path, max_steps=10, lr=1e8, warmup_steps=0, save_every=1, keep_checkpoints=20)
    with pytest.raises(TrainingError, match="not finite") as stopped:
        Trainer(config).train()
    saved = checkpoints(tmp_path)
    assert saved, "the run should have saved a checkpoint before it stopped"
    assert f"last good checkpoint: {saved[-1]}" in str(stopped.value)
    for path in saved:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        assert non_finite(state) == [], path


class InfiniteGradient(torch.autograd.Function):
    """Identity forward (a finite loss) whose backward sends an infinite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_a_non_finite_gradient_norm_stops_before_the_update(data, tmp_path, monkeypatch):
    trainer = Trainer(small_config(data, tmp_path, max_steps=6, save_every=1))
    real_forward = fdpo.PreferenceLoss.forward

    def exploding(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training and trainer.step == 2:
            out.loss = InfiniteGradient.apply(out.loss)
        return out

    monkeypatch.setattr(fdpo.PreferenceLoss, "forward", exploding)
    before = {}
    real_save = trainer.save_checkpoint

    def save_and_snapshot():
        path = real_save()
        before.update({k: v.detach().clone() for k, v in trainer.hf_model.state_dict().items()})
        before["adam_steps"] = [s["step"].clone() for s in trainer.optimizer.state.values()]
        return path

    monkeypatch.setattr(trainer, "save_checkpoint", save_and_snapshot)
    with pytest.raises(TrainingError, match=r"gradient norm is not finite \((inf|nan)\) at step 3; stopped before the "
                                            r"update.*last good checkpoint: .*step-0000002"):
        trainer.train()
    for name, value in trainer.hf_model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    assert [s["step"] for s in trainer.optimizer.state.values()] == before["adam_steps"]
    assert [p.name for p in checkpoints(tmp_path)] == ["step-0000001", "step-0000002"]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_non_finite_parameters_after_an_update_stop_the_run(data, tmp_path, monkeypatch):
    trainer = Trainer(small_config(data, tmp_path, max_steps=6, save_every=1))
    real_step = trainer.optimizer.step

    def corrupting_step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        if trainer.step == 3:
            with torch.no_grad():
                trainer.params[0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(trainer.optimizer, "step", corrupting_step)
    with pytest.raises(TrainingError, match=r"parameters are not finite after the update of step 4.*step-0000003"):
        trainer.train()
    assert checkpoints(tmp_path)[-1].name == "step-0000003"


def test_a_state_with_non_finite_tensors_is_never_written(data, tmp_path):
    trainer = Trainer(small_config(data, tmp_path, max_steps=2))
    trainer.train_step()
    good = trainer.save_checkpoint()
    trainer.train_step()
    state = next(iter(trainer.optimizer.state.values()))
    state["exp_avg_sq"].view(-1)[0] = float("inf")
    with pytest.raises(TrainingError, match=r"state of step 2 holds non-finite tensors \(optimizer\.state\..*"
                                            r"exp_avg_sq\).*last good checkpoint: .*step-0000001"):
        trainer.save_checkpoint()
    assert checkpoints(tmp_path) == [good]


# -- 2. one run per output directory -------------------------------------------------------------------------------


def test_a_new_run_refuses_a_used_output_directory(data, tmp_path, capsys):
    out = tmp_path / "run"
    first = Trainer(small_config(data, out, max_steps=4, save_every=2))
    first.train()
    before = tree(out)
    with pytest.raises(RunDirectoryError, match=r"already holds a run \(checkpoints, metrics\.jsonl, final, "
                                                r"run\.json\): pass --resume latest .* a new --output-dir, or "
                                                r"--overwrite"):
        Trainer(small_config(data, out, max_steps=2))
    assert tree(out) == before
    command = ["--data", str(data["train"]), "--output-dir", str(out), "--max-steps", "2", "--no-progress"]
    assert main(command) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--overwrite" in error
    assert tree(out) == before

    second = Trainer(small_config(data, out, max_steps=2, overwrite=True))
    second.train()
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert [p.name for p in checkpoints(out)] == ["step-0000002"]
    owner = json.loads((out / "run.json").read_text())
    assert owner["run_id"] == second.run["run_id"] != first.run["run_id"]
    # a directory that holds no run (empty, or unrelated files) is fine
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    Trainer(small_config(data, tmp_path / "other", max_steps=1)).train()
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_resume_refuses_settings_that_change_the_state_and_reports_the_rest(data, tmp_path):
    out = tmp_path / "run"
    Trainer(small_config(data, out, max_steps=2, save_every=1)).train()
    other = write_data(tmp_path, train=48)
    refused = [({"method": "epsilon_dpo"}, "method 'dpo' -> 'epsilon_dpo'"),
               ({"method": "tdpo"}, "method 'dpo' -> 'tdpo'"),
               ({"divergence": "js"}, "divergence 'reverse_kl' -> 'js'"),
               ({"loss": "hinge"}, "loss 'sigmoid' -> 'hinge'"),
               ({"beta": 0.2}, "beta 0.1 -> 0.2"),
               ({"data": str(other["train"])}, "data '"),
               ({"seed": 1}, "seed 0 -> 1")]
    before = tree(out)
    for overrides, named in refused:
        with pytest.raises(RunDirectoryError, match="settings that define its state differ") as caught:
            Trainer(small_config(data, out, max_steps=4, resume="latest", **overrides)).train()
        assert named in str(caught.value), overrides
        assert ("data digest is of the training pairs' tokens" in str(caught.value)) == ("data" in overrides)
        assert tree(out) == before
    resumed = Trainer(small_config(data, out, max_steps=4, resume="latest", eval_every=1, keep_checkpoints=3))
    summary = resumed.train()
    assert (summary["steps"], summary["steps_this_call"]) == (4, 2)
    assert summary["resumed_from"].endswith("step-0000002")
    assert any("max_steps 2 -> 4" in note and "eval_every 0 -> 1" in note for note in summary["notes"])
    changed = json.loads((out / "run.json").read_text())["resumes"][-1]["changed"]
    assert changed["max_steps"] == [2, 4] and changed["keep_checkpoints"] == [2, 3]


def test_a_killed_run_resumes_without_repeating_metrics(data, tmp_path, monkeypatch):
    settings = {"max_steps": 6, "save_every": 2, "eval_every": 2}
    straight = Trainer(small_config(data, tmp_path / "a", **settings))
    expected = straight.train()
    killed = Trainer(small_config(data, tmp_path / "b", **settings))
    real_append = killed.metrics.append

    def append_then_die(record):
        real_append(record)
        if record["split"] == "train" and record["step"] == 5:
            raise KeyboardInterrupt("kill -9")

    monkeypatch.setattr(killed.metrics, "append", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert read_metrics(tmp_path / "b")[-1]["step"] == 5          # logged past the step-4 checkpoint
    resumed = Trainer(small_config(data, tmp_path / "b", resume="latest", **settings))
    summary = resumed.train()
    assert without_time(read_metrics(tmp_path / "b", None)) == without_time(read_metrics(tmp_path / "a", None))
    assert (summary["steps"], summary["steps_this_call"]) == (6, 2)
    for key in ("first_eval", "last_eval", "first_train"):
        assert without_time([summary[key]]) == without_time([expected[key]]), key


# -- 4. checkpoints are verified and never run code ----------------------------------------------------------------


class Payload:
    """What an attacker would put in a state.pt: unpickling it runs a shell command."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def rewrite_manifest(path) -> None:
    """Recompute the checkpoint's manifest, as someone who altered it on purpose could."""
    manifest = json.loads((path / MANIFEST).read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"sha256": file_digest(path / name), "bytes": (path / name).stat().st_size}
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_a_crafted_checkpoint_cannot_run_code(data, tmp_path):
    out = tmp_path / "run"
    Trainer(small_config(data, out, max_steps=2, save_every=1)).train()
    crafted = checkpoints(out)[-1]
    marker = tmp_path / "pwned"
    torch.save({"model": Payload(marker), "optimizer": {}, "step": 2, "run": {}}, crafted / "state.pt")
    rewrite_manifest(crafted)
    with pytest.raises(CheckpointError, match=f"{crafted}: state.pt cannot be loaded safely"):
        Trainer(small_config(data, out, max_steps=3, resume=str(crafted))).train()
    assert not marker.exists()
    trainer = Trainer(small_config(data, out, max_steps=3, resume="latest"))
    trainer.train()
    assert not marker.exists()
    assert trainer.resumed_from.name == "step-0000001"
    assert any(f"skipping checkpoint {crafted}" in note for note in trainer.notes)


def flip_byte(path) -> None:
    data = bytearray((path / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / "state.pt").write_bytes(bytes(data))


def truncate(path) -> None:
    data = (path / "state.pt").read_bytes()
    (path / "state.pt").write_bytes(data[:len(data) // 3])


def empty(path) -> None:
    (path / "state.pt").write_bytes(b"")


def no_manifest(path) -> None:
    (path / MANIFEST).unlink()


def garbled_manifest(path) -> None:
    (path / MANIFEST).write_text("{not json")


@pytest.mark.parametrize("damage, reason", [(flip_byte, "does not match its SHA-256"), (truncate, "truncated"),
                                            (empty, "has 0 bytes"), (no_manifest, "has no manifest.json"),
                                            (garbled_manifest, "manifest.json is unreadable")])
def test_a_damaged_checkpoint_is_reported_and_latest_falls_back(data, tmp_path, capsys, damage, reason):
    out = tmp_path / "run"
    Trainer(small_config(data, out, max_steps=3, save_every=1, keep_checkpoints=5)).train()
    newest = checkpoints(out)[-1]
    damage(newest)
    with pytest.raises(CheckpointError, match=reason) as caught:
        verify_checkpoint(newest)
    assert str(newest) in str(caught.value)
    with pytest.raises(CheckpointError, match=reason):
        Trainer(small_config(data, out, max_steps=3, resume=str(newest))).train()
    capsys.readouterr()
    trainer = Trainer(small_config(data, out, max_steps=3, resume="latest", keep_checkpoints=5))
    trainer.train()
    assert trainer.resumed_from.name == "step-0000002"
    assert f"skipping checkpoint {newest}" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    verify_checkpoint(checkpoints(out)[-1])                       # step 3 written again, intact


def test_a_leftover_temporary_checkpoint_is_removed_on_the_next_start(data, tmp_path):
    out = tmp_path / "run"
    Trainer(small_config(data, out, max_steps=1)).train()
    leftover = out / "checkpoints" / ".tmp-step-0000002-4242"
    leftover.mkdir()
    (leftover / "state.pt").write_bytes(b"partial write, then the disk was full")
    half_written = [out / ".metrics.jsonl.4242.tmp", out / ".run.json.4242.tmp"]
    for path in half_written:
        path.write_text("{")
    trainer = Trainer(small_config(data, out, max_steps=2, resume="latest"))
    for path in (leftover, *half_written):
        assert not path.exists()
        assert any(str(path) in note for note in trainer.notes)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_corrupt_reference_cache_is_recomputed_with_a_warning(data, tmp_path):
    cache = tmp_path / "cache"
    options = {"max_steps": 1, "reference": "cache", "cache_dir": str(cache)}
    good = Trainer(small_config(data, tmp_path / "a", **options)).reference.table
    files = sorted(cache.glob("reference-*.pt"))
    for corrupt in (b"", b"\x80\x04garbage", files[0].read_bytes()[:100]):
        for path in files:
            path.write_bytes(corrupt)
        with pytest.warns(UserWarning, match="reference cache .* is unreadable"):
            again = Trainer(small_config(data, tmp_path / f"b{len(corrupt)}", **options))
        torch.testing.assert_close(again.reference.table, good, rtol=0, atol=0)
    stored = torch.load(files[0], weights_only=True)
    torch.save({"key": stored["key"], "sums": stored["sums"][:3]}, files[0])
    with pytest.warns(UserWarning, match="does not hold these pairs' sums"):
        Trainer(small_config(data, tmp_path / "c", **options))


# -- 5. one-line errors for the common mistakes --------------------------------------------------------------------


def test_an_unloadable_model_fails_fast_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_models, "hub_reachable", lambda timeout=5.0: False)
    start = time.perf_counter()
    with pytest.raises(ValueError) as caught:
        train_models.load_model_and_tokenizer(TrainConfig(model="nobody/no-such-model"))
    assert time.perf_counter() - start < 10
    message = str(caught.value)
    assert "\n" not in message and "'nobody/no-such-model'" in message
    assert "no such path" in message and "unreachable" in message
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ValueError, match=r"cannot load model '.*not-a-model'") as caught:
        train_models.load_model_and_tokenizer(TrainConfig(model=str(tmp_path / "not-a-model")))
    assert "\n" not in str(caught.value)
    assert main(["--model", "nobody/no-such-model", "--output-dir", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_an_unwritable_output_directory_is_one_line(data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["--data", str(data["train"]), "--output-dir", str(blocker / "run")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"output directory {blocker / 'run'} is not writable" in error


@pytest.mark.parametrize("device, cuda_devices, message", [
    ("bogus", 0, "device must be 'auto' or a torch device such as 'cpu', 'cuda' or 'cuda:1', got 'bogus'"),
    ("cuda:x", 1, "device must be 'auto' or a torch device"),
    ("cuda", 0, "device='cuda' but CUDA is not available here"),
    ("cuda:3", 2, "device='cuda:3' but this machine has 2 CUDA device(s)"),
])
def test_a_device_this_machine_lacks_is_refused_before_anything_is_created(tmp_path, monkeypatch, capsys, device,
                                                                           cuda_devices, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    with pytest.raises(ValueError) as caught:
        TrainConfig(device=device).validate()
    assert str(caught.value).startswith(message)
    assert main(["--device", device, "--output-dir", str(tmp_path / "run"), "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error
    assert not (tmp_path / "run").exists()
    TrainConfig(device="cpu").validate()


def test_pairs_truncated_to_identical_responses_are_counted_in_one_line(tmp_path, capsys):
    """max_length cuts responses that differ only late to the same tokens: such pairs teach nothing."""
    pairs = tmp_path / "pairs.jsonl"
    records = [{"prompt": "p", "chosen": f"{i}abcdefX", "rejected": f"{i}abcdefY" if i < 3 else f"{i}zzz"}
               for i in range(8)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    distinct = tmp_path / "distinct.jsonl"
    distinct.write_text("".join(json.dumps(r) + "\n" for r in records[3:]), encoding="utf-8")
    trainer = Trainer(small_config({"train": pairs, "eval": distinct}, tmp_path / "run", max_length=6))
    note = "3 of 8 training pairs have identical chosen and rejected tokens (after truncation to max_length=6)"
    assert sum(note in n for n in trainer.notes) == 1 and not any("held-out pairs have identical" in n
                                                                   for n in trainer.notes)
    assert [line for line in capsys.readouterr().err.splitlines() if note in line] != []


def test_truncated_responses_are_counted_in_one_line(tmp_path, capsys):
    """A long chosen answer cut to max_length loses its end and its eos while the short rejected one keeps
    them: the run says how many of each side were cut and how many pairs on one side only."""
    pairs = tmp_path / "pairs.jsonl"
    records = [{"prompt": "p", "chosen": f"{i}" + "long answer " * (i % 2 + 1), "rejected": f"{i}x"}
               for i in range(8)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    trainer = Trainer(small_config({"train": pairs, "eval": pairs}, tmp_path / "run", max_length=16))
    note = ("4 chosen and 0 rejected responses of the 8 training pairs were cut to max_length=16 tokens (their eos "
            "with them), 4 pairs on one side only")
    assert sum(note in n for n in trainer.notes) == 1
    assert [line for line in capsys.readouterr().err.splitlines() if note in line] != []
    assert [e.chosen[-1] != 258 for e in trainer.train_examples] == [False, True] * 4
    assert all(e.rejected[-1] == 258 for e in trainer.train_examples)
    whole = Trainer(small_config({"train": pairs, "eval": pairs}, tmp_path / "whole", max_length=64))
    assert not any("were cut to max_length" in n for n in whole.notes)


def test_max_length_defaults_to_the_models_context_beyond_the_built_in_model():
    """64 fits the built-in task only: another model's default is its context (config, then tokenizer)."""
    import types

    assert TrainConfig().resolved_max_length() == 64
    assert TrainConfig(max_length=100, model="some/model").resolved_max_length() == 100
    config = TrainConfig(model="some/model")
    model = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=4096))
    assert config.resolved_max_length(model, byte_tokenizer()) == 4096
    no_positions = types.SimpleNamespace(config=types.SimpleNamespace())
    assert config.resolved_max_length(no_positions, byte_tokenizer(model_max_length=2048)) == 2048
    with pytest.raises(ValueError, match="set max_length"):
        config.resolved_max_length(no_positions, byte_tokenizer(model_max_length=int(1e30)))
    with pytest.raises(ValueError, match="max_length must be None or an integer >= 2"):
        TrainConfig(max_length=1).validate()
    assert "max_position_embeddings" in build_parser().format_help()


def test_repeated_training_pairs_and_held_out_pairs_seen_in_training_are_counted(tmp_path, capsys):
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    records = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(8)]
    new = {"prompt": "new", "chosen": "a", "rejected": "b"}
    train.write_text("".join(json.dumps(r) + "\n" for r in [*records, *records[:3]]), encoding="utf-8")
    held_out.write_text("".join(json.dumps(r) + "\n" for r in [*records[2:6], new]), encoding="utf-8")
    trainer = Trainer(small_config({"train": train, "eval": held_out}, tmp_path / "run"))
    notes = ["3 of 11 training pairs repeat an earlier training pair (the same tokens)",
             "4 of 5 held-out pairs are also training pairs (the same tokens)"]
    err = capsys.readouterr().err
    for note in notes:
        assert sum(note in n for n in trainer.notes) == 1 and note in err
    clean = Trainer(small_config({"train": held_out, "eval": tmp_path / "train.jsonl"}, tmp_path / "clean",
                                 batch_size=4))
    assert not any("repeat an earlier" in n for n in clean.notes)


def test_a_tokenizer_without_a_pad_token_is_padded_with_eos(tmp_path, data):
    """Trainer(model=..., tokenizer=...) with GPT-2's kind of tokenizer (no pad token) failed at its first
    batch (torch.full with None); it pads with eos, as when the trainer loads the model."""
    import train_tokenizers

    tokenizer = train_tokenizers.gpt2_like()
    assert tokenizer.pad_token_id is None
    trainer = Trainer(small_config(data, tmp_path / "run", max_steps=1), model=tiny_llama(0, vocab_size=len(tokenizer)),
                      tokenizer=tokenizer)
    summary = trainer.train()
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and summary["steps"] == 1


def test_invalid_utf8_in_a_data_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "sort: 2 1", "chosen": "1 2", "rejected": "2 1"}).encode()
    path.write_bytes(good + b"\n" + good[:10] + b"\xff\xfe" + good[10:] + b"\n")
    with pytest.raises(ValueError, match=f"{path}:2: not valid UTF-8 \\(byte 0xff at column 11\\)"):
        list(read_jsonl(path))


@pytest.mark.parametrize("settings, named", [
    ({"method": "tdpo", "loss": "ipo"}, "loss='ipo'"),
    ({"method": "tdpo", "divergence": "js"}, "divergence='js'"),
    ({"method": "tdpo", "label_smoothing": 0.1}, "label_smoothing=0.1"),
    ({"method": "tdpo", "nll_weight": 1.0}, "nll_weight=1.0"),
    ({"method": "dpo", "tdpo_variant": "tdpo1"}, "tdpo_variant='tdpo1'"),
    ({"method": "dpo", "epsilon": 0.05}, "epsilon=0.05"),
    ({"method": "epsilon_dpo", "tdpo_variant": "tdpo1"}, "tdpo_variant='tdpo1'"),
    ({"method": "dpo", "divergence": "js", "alpha": 0.3}, "alpha=0.3"),
    ({"method": "tdpo", "tdpo_variant": "tdpo1", "alpha": 0.3}, "alpha=0.3"),
    ({"method": "dpo", "loss": "hinge", "label_smoothing": 0.1}, "label_smoothing=0.1"),
    ({"reference": "copy", "cache_dir": "somewhere"}, "cache_dir='somewhere'"),
    ({"method": "dpo", "token_divergence": "js"}, "token_divergence='js'"),
    ({"method": "epsilon_dpo", "token_alpha": 0.3}, "token_alpha=0.3"),
    ({"method": "dpo", "token_beta": 0.3}, "token_beta=0.3"),
    ({"method": "tdpo", "token_divergence": "js", "token_alpha": 0.3}, "token_alpha=0.3"),
    ({"method": "tdpo", "token_beta": 0.3}, "token_beta=0.3"),
])
def test_settings_the_run_would_ignore_are_refused(settings, named):
    with pytest.raises(ValueError, match="has no effect here") as caught:
        TrainConfig(**settings).validate()
    assert str(caught.value).startswith(named)


def test_settings_the_run_uses_are_accepted():
    for settings in ({"method": "tdpo", "alpha": 0.3, "tdpo_variant": "tdpo2"},
                     {"method": "tdpo", "tdpo_variant": "tdpo1"},
                     {"method": "tdpo", "token_divergence": "alpha", "token_alpha": 0.3},
                     {"method": "tdpo", "token_divergence": "js", "token_beta": 0.3},
                     {"method": "epsilon_dpo", "epsilon": 0.05, "loss": "robust", "label_smoothing": 0.1},
                     {"method": "dpo", "divergence": "alpha", "alpha": 0.3, "loss": "sigmoid", "label_smoothing": 0.1},
                     {"reference": "cache", "cache_dir": "somewhere"}):
        TrainConfig(**settings).validate()


def test_resume_refuses_another_token_divergence(data, tmp_path):
    out = tmp_path / "run"
    Trainer(small_config(data, out, method="tdpo", max_steps=1, save_every=1)).train()
    with pytest.raises(RunDirectoryError, match="settings that define its state differ") as caught:
        Trainer(small_config(data, out, method="tdpo", max_steps=2, resume="latest", token_divergence="js")).train()
    assert "token_divergence 'forward_kl' -> 'js'" in str(caught.value)


def test_runs_recorded_before_the_token_divergence_fields_still_resume():
    """A run.json without the token_* fields ran forward_kl: resuming it with the defaults is no mismatch,
    with another token divergence it is (named as a change from forward_kl)."""
    current = {"method": "tdpo", "token_divergence": "forward_kl", "token_alpha": 0.5, "token_beta": 0.5}
    old = {"method": "tdpo"}
    assert mismatched_fields(old, current) == {}
    assert mismatched_fields(old, {**current, "token_divergence": "js"}) == {"token_divergence": ("forward_kl", "js")}


def test_help_states_each_default_once():
    text = " ".join(build_parser().format_help().split())
    options = text.split(" --")[1:]
    assert len(options) > 30
    for option in options:
        assert option.count("default:") <= 1, option
    for flag, default in (("token-divergence", "forward_kl"), ("token-alpha", "0.5"), ("token-beta", "0.5")):
        [option] = [o for o in options if o.startswith(flag + " ")]
        assert f"(default: {default})" in option


def test_without_a_terminal_progress_is_a_few_plain_lines(data, tmp_path, capsys):
    assert main(["--data", str(data["train"]), "--output-dir", str(tmp_path / "run"), "--max-steps", "20",
                 "--log-every", "10", "--batch-size", "8", "--backend", "torch", "--eval-every", "0"]) == 0
    error = capsys.readouterr().err
    assert "\r" not in error
    lines = error.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["train step 10/20", "train step 20/20"]


@pytest.mark.slow
def test_a_process_killed_with_sigkill_resumes_to_the_uninterrupted_run(data, tmp_path):
    """The real thing: `python -m fdpo.train` killed by SIGKILL between checkpoints, then resumed."""
    command = [sys.executable, "-m", "fdpo.train", "--data", str(data["train"]), "--eval-data", str(data["eval"]),
               "--max-steps", "40", "--batch-size", "8", "--log-every", "1", "--save-every", "8",
               "--eval-every", "16", "--backend", "torch", "--no-progress", "--nll-weight", "0"]
    straight = subprocess.run([*command, "--output-dir", str(tmp_path / "a")], capture_output=True, text=True,
                              timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "b"
    victim = subprocess.Popen([*command, "--output-dir", str(out)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and victim.poll() is None:
        steps = [r["step"] for r in read_metrics(out)] if (out / "metrics.jsonl").is_file() else []
        if steps and steps[-1] >= 19:                      # past the step-16 checkpoint, before step 24's
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    killed_at = read_metrics(out)[-1]["step"]
    assert 16 < killed_at < 40
    resumed = subprocess.run([*command, "--output-dir", str(out), "--resume", "latest"], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "in this call, resumed from" in resumed.stdout
    assert without_time(read_metrics(out, None)) == without_time(read_metrics(tmp_path / "a", None))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_cache_with_damaged_bytes_that_still_loads_is_recomputed(tmp_path):
    """torch.load does not check the archive's CRCs: a flipped bit in the stored sums would load as a
    plausible wrong number. read_cache checks every member's CRC first."""
    sums = torch.tensor([[-12.5, -13.25], [-20.0, -18.75]])
    path = tmp_path / "reference-x.pt"
    torch.save({"key": "k" * 64, "sums": sums}, path)
    raw = bytearray(path.read_bytes())
    raw[raw.find(sums.numpy().tobytes()) + 3] ^= 0x01
    path.write_bytes(bytes(raw))
    assert torch.load(path, weights_only=True)["sums"][0, 0] != -12.5, "the damage loads silently"
    with pytest.warns(UserWarning, match="is unreadable .* fails its checksum"):
        assert read_cache(path, "k" * 64, 2) is None


def test_the_cache_key_covers_the_compute_dtype_and_the_model_configuration(data, tmp_path):
    """Sums computed under bf16 autocast, or by a model of the same weights but another configuration
    (rms_norm_eps here; rope, head split: no weight records them), are other sums: other cache files."""
    tokenizer = byte_tokenizer()
    examples = load_preference_data(str(data["train"]), tokenizer, max_length=64)[:8]
    cache = tmp_path / "cache"

    def build(model, autocast=False):
        reference = FrozenReference(CausalLM(frozen_copy(model), backend="torch"))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            CachedReference.build(reference, examples, cache, batch_size=8, pad_token_id=tokenizer.pad_token_id)
        return {p.name for p in cache.glob("reference-*.pt")}

    base = tiny_llama(0)
    first = build(base)
    assert build(base) == first, "the same settings reuse the file"
    with_bf16 = build(base, autocast=True)
    other = type(base)(type(base.config).from_dict({**base.config.to_dict(), "rms_norm_eps": 0.1}))
    other.load_state_dict(base.state_dict())
    assert len(build(other)) == len(with_bf16) + 1 == len(first) + 2


# -- 6. one process per output directory ---------------------------------------------------------------------------

HOLD_LOCK = """
import fcntl, json, os, socket, sys
lock = open(sys.argv[1], "a+")
fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
lock.truncate(0)
lock.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "2026-01-01T00:00:00Z"}))
lock.flush()
print("locked", flush=True)
sys.stdin.read()
"""


def test_an_output_directory_locked_by_another_process_is_refused_untouched(data, tmp_path, capsys):
    """Another process holds <output-dir>/.lock (a run still training, writing a checkpoint): a fresh start,
    a resume, an overwrite are refused in one line naming its pid, before anything is read, tidied or cleared."""
    out = tmp_path / "run"
    Trainer(small_config(data, out, max_steps=2, save_every=1)).train()
    writing = out / "checkpoints" / ".tmp-step-0000003-4242"          # the other process's checkpoint in progress
    writing.mkdir()
    (writing / "state.pt").write_bytes(b"being written")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = tree(out)
        for settings in ({}, {"resume": "latest"}, {"resume": "latest", "beta": 0.2}, {"overwrite": True}):
            with pytest.raises(RunDirectoryError, match=f"output directory {out} is in use by another run "
                                                        f"\\(pid {holder.pid} on host "):
                Trainer(small_config(data, out, max_steps=4, **settings))
            assert tree(out) == before, settings
        assert main(["--data", str(data["train"]), "--output-dir", str(out), "--resume", "latest",
                     "--max-steps", "4", "--backend", "torch", "--no-progress"]) == 1
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and f"pid {holder.pid}" in error
        assert tree(out) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    trainer = Trainer(small_config(data, out, max_steps=4, resume="latest"))    # the holder is gone
    assert not writing.exists()                                                 # now a dead run's leftover
    trainer.train()
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


def test_the_output_directory_lock_is_released_when_a_run_ends_or_fails(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    exploding = Trainer(small_config(data, out, max_steps=10, lr=1e8, warmup_steps=0))
    with pytest.raises(RunDirectoryError, match=f"in use by another run \\(pid {os.getpid()} on host"):
        Trainer(small_config(data, out, max_steps=1, overwrite=True))
    with pytest.raises(TrainingError, match="not finite"):
        exploding.train()
    real_load = loop.load_preference_data

    def failing_load(*args, **kwargs):
        raise ValueError("unreadable data")

    monkeypatch.setattr(loop, "load_preference_data", failing_load)
    with pytest.raises(ValueError, match="unreadable data"):
        Trainer(small_config(data, out, max_steps=1, overwrite=True))
    monkeypatch.setattr(loop, "load_preference_data", real_load)
    Trainer(small_config(data, out, max_steps=1, overwrite=True)).train()
    Trainer(small_config(data, out, max_steps=2, resume="latest")).train()
    assert [r["step"] for r in read_metrics(out)] == [1, 2]



@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_file_system_without_flock_trains_without_the_lock_and_says_so(data, tmp_path, monkeypatch, code):
    """flock fails with ENOSYS (Lustre without -o flock), ENOLCK (NFSv3 without lockd) or EOPNOTSUPP: the run
    goes on without the lock and says so in one note; another error of flock is still refused."""
    def no_flock(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "run"
    summary = Trainer(small_config(data, out, max_steps=1)).train()
    notes = [note for note in summary["notes"] if "without flock" in note]
    assert notes == [f"output directory {out} is on a file system without flock ({os.strerror(code)}): running "
                     "without its lock, so nothing stops another process from using it at the same time"]
    assert [r["step"] for r in read_metrics(out)] == [1]

    def failing_flock(fd, operation):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(fcntl, "flock", failing_flock)
    with pytest.raises(RunDirectoryError, match=f"cannot lock output directory {out} \\(Input/output error\\)"):
        Trainer(small_config(data, out, max_steps=2, resume="latest"))

# -- 7. a write that fails (a full disk) ---------------------------------------------------------------------------


def test_a_failed_write_is_one_line_naming_the_path_and_leaves_no_temporary_copy(data, tmp_path, monkeypatch,
                                                                                  capsys):
    """torch.save reports a full disk as a RuntimeError, save_pretrained as an OSError: either becomes a
    CheckpointError naming what was being written, and the half-written temporary directory is removed."""
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save({"partial": True}, f)
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed\nmore detail")

    monkeypatch.setattr(torch, "save", disk_full)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=f"cannot write {out / 'checkpoints' / 'step-0000002'}: RuntimeError: "
                                              r"\[enforce fail .* file write failed$"):
        Trainer(small_config(data, out, max_steps=4, save_every=2)).train()
    assert list((out / "checkpoints").iterdir()) == []
    assert main(["--data", str(data["train"]), "--output-dir", str(tmp_path / "cli"), "--max-steps", "1",
                 "--batch-size", "8", "--eval-every", "0", "--backend", "torch", "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"cannot write {tmp_path / 'cli' / 'checkpoints' / 'step-0000001'}" in error
    monkeypatch.setattr(torch, "save", real_save)

    trainer = Trainer(small_config(data, tmp_path / "final", max_steps=1))

    def save_pretrained(directory, **kwargs):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.hf_model, "save_pretrained", save_pretrained)
    with pytest.raises(CheckpointError, match=f"cannot write {tmp_path / 'final' / 'final'}: OSError: \\[Errno 28\\]") \
            as caught:
        trainer.train()
    assert isinstance(caught.value.__cause__, OSError)         # the write's own error, through _on_rank0
    assert sorted(p.name for p in (tmp_path / "final").iterdir() if "final" in p.name) == []

    metrics = tmp_path / "metrics.jsonl"
    metrics.mkdir()                                                       # cannot be opened for appending
    with pytest.raises(CheckpointError, match=f"cannot write {metrics}: IsADirectoryError"):
        MetricsLog(metrics).append({"step": 1})


def test_a_damaged_run_record_does_not_block_resuming_the_directorys_checkpoints(data, tmp_path):
    """Every checkpoint holds the run's record: resuming one of the directory's own rewrites run.json from it;
    a checkpoint from elsewhere cannot be checked against the damaged record and is refused, without
    suggesting --overwrite (which would delete the intact checkpoints)."""
    out = tmp_path / "run"
    first = Trainer(small_config(data, out, max_steps=2, save_every=1, keep_checkpoints=5))
    first.train()
    shutil.copytree(out / "checkpoints" / "step-0000002", tmp_path / "elsewhere" / "step-0000002")
    (out / "run.json").write_text('{"run_id": ')
    with pytest.raises(RunDirectoryError) as caught:
        Trainer(small_config(data, out, max_steps=3, resume=str(tmp_path / "elsewhere" / "step-0000002"))).train()
    message = str(caught.value)
    assert f"{out / 'run.json'} is unreadable" in message and "are intact" in message
    assert "--overwrite" not in message
    summary = Trainer(small_config(data, out, max_steps=3, resume="latest")).train()
    assert summary["steps"] == 3 and any("run.json is unreadable" in note for note in summary["notes"])
    assert json.loads((out / "run.json").read_text())["run_id"] == first.run["run_id"]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_only_a_failed_write_becomes_a_cannot_write_error(tmp_path, monkeypatch):
    """An OSError or torch's serialization writer's RuntimeError is a failed write: a CheckpointError naming the
    path, chained to the error. Other errors in a write (NotImplementedError, RecursionError, a CUDA error)
    are not the disk's: they propagate unchanged, with their traceback; the temporary copy goes either way."""
    root = tmp_path / "checkpoints"
    temporary = root / f".tmp-step-0000001-{os.getpid()}"
    full_disk = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    for error in (OSError(28, "No space left on device"), full_disk):
        with pytest.raises(CheckpointError, match=f"cannot write {root / 'step-0000001'}: ") as caught:
            with writing(root / "step-0000001", temporary=temporary):
                temporary.mkdir(parents=True)
                raise error
        assert caught.value.__cause__ is error and not temporary.exists()
    for error in (NotImplementedError("save_vocabulary is not implemented"),
                  RecursionError("maximum recursion depth exceeded while pickling an object"),
                  RuntimeError("CUDA error: an illegal memory access was encountered")):
        def save(obj, f, *args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(torch, "save", save)
        with pytest.raises(type(error)) as caught:
            write_checkpoint(root, "step-0000001", {"step": 1}, {})
        assert caught.value is error and not temporary.exists()

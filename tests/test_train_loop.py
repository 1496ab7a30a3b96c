"""The training loop: schedule, calibration, an end-to-end run, exact resume, faults, config, CLI."""

import copy
import io
import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fdpo
from fdpo.train import TrainConfig, Trainer, TrainingError, expected_calibration_error, parse_args
from fdpo.train.checkpoint import latest_checkpoint, load_checkpoint_state, write_checkpoint
from fdpo.train.cli import format_summary, main
from fdpo.train.loop import lr_factor
from fdpo.train.objective import build_loss

from train_setup import read_metrics, small_config, write_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Small train / eval files of the bundled task (64 and 16 pairs)."""
    return write_data(tmp_path_factory.mktemp("data"))


def test_lr_schedule():
    warm = [lr_factor(s, warmup_steps=4, max_steps=14, schedule="cosine") for s in range(4)]
    assert warm == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])
    for step in (4, 7, 9, 14):
        progress = (step - 4) / 10
        assert lr_factor(step, warmup_steps=4, max_steps=14, schedule="cosine") == pytest.approx(
            (1 + math.cos(math.pi * progress)) / 2)
        assert lr_factor(step, warmup_steps=4, max_steps=14, schedule="linear") == pytest.approx(1 - progress)
        assert lr_factor(step, warmup_steps=4, max_steps=14, schedule="constant") == 1.0


def test_the_logged_lr_is_the_one_the_step_used(data, tmp_path):
    """Step k (1-based) updates with lr * lr_factor(k - 1): warmup 1/3, 2/3, then linear decay from 1 to
    1/4 at step 6; after a resume with another peak lr, its steps log the new rate."""
    settings = {"warmup_steps": 2, "schedule": "linear", "lr": 1e-3, "save_every": 3}
    Trainer(small_config(data, tmp_path, max_steps=6, **settings)).train()
    expected = [1e-3 * lr_factor(k - 1, warmup_steps=2, max_steps=6, schedule="linear") for k in range(1, 7)]
    assert expected == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 0.75e-3, 0.5e-3, 0.25e-3])
    assert [r["lr"] for r in read_metrics(tmp_path)] == pytest.approx(expected, rel=1e-12)
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000006")                      # resume from step 3
    Trainer(small_config(data, tmp_path, max_steps=6, **{**settings, "lr": 2e-3}, resume="latest")).train()
    assert [r["lr"] for r in read_metrics(tmp_path)] == pytest.approx([*expected[:3], *(2 * x for x in expected[3:])],
                                                                    rel=1e-12)


def numpy_ece(margins: np.ndarray, bins: int = 10) -> float:
    """Independent float64 ECE: loop over pairs, bins [0.5 + k/20, 0.5 + (k+1)/20)."""
    members = [[] for _ in range(bins)]
    for m in margins:
        p = 1.0 / (1.0 + math.exp(-m))
        confidence = max(p, 1.0 - p)
        correct = 1.0 if m > 0 else 0.5 if m == 0 else 0.0
        k = min(int((confidence - 0.5) / (0.5 / bins)), bins - 1)
        members[k].append((confidence, correct))
    total = 0.0
    for group in members:
        if group:
            conf = sum(c for c, _ in group) / len(group)
            acc = sum(a for _, a in group) / len(group)
            total += len(group) / len(margins) * abs(acc - conf)
    return total


def test_expected_calibration_error():
    rng = np.random.default_rng(0)
    margins = np.concatenate([rng.normal(0.5, 2.0, 200), [0.0, 0.0, 50.0, -50.0]])
    assert expected_calibration_error(torch.tensor(margins, dtype=torch.float32)) == pytest.approx(
        numpy_ece(margins.astype(np.float32).astype(np.float64)), abs=1e-6)
    # all ties: confidence 1/2, half right -> perfectly calibrated; sure and always right -> 0
    assert expected_calibration_error(torch.zeros(8)) == 0.0
    assert expected_calibration_error(torch.full((4,), 40.0)) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(torch.full((4,), -40.0)) == pytest.approx(1.0)


def test_end_to_end_loss_falls_and_held_out_accuracy_rises(data, tmp_path):
    config = small_config(data, tmp_path, max_steps=30, lr=2e-3, eval_every=15, log_every=5)
    trainer = Trainer(config)
    summary = trainer.train()
    train, evals = read_metrics(tmp_path), read_metrics(tmp_path, "eval")
    assert [r["step"] for r in train] == [1, 5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in evals] == [0, 15, 30]
    assert evals[0]["loss"] == pytest.approx(math.log(2)) and evals[0]["accuracy"] == 0.0
    assert evals[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.05
    assert evals[-1]["accuracy"] >= 0.75 and evals[-1]["kl"] > 0
    assert train[-1]["loss"] < train[0]["loss"]
    assert 0 < evals[-1]["entropy"] <= math.log(259) + 1e-4
    assert summary["steps"] == 30 and (tmp_path / "final" / "config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    trained = trainer.hf_model.state_dict()
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)
    assert AutoTokenizer.from_pretrained(tmp_path / "final").eos_token_id == 258


def final_parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.hf_model.state_dict().items()}


@pytest.mark.parametrize("method", ["dpo", "epsilon_dpo"])
def test_resume_is_exact(data, tmp_path, method):
    straight = Trainer(small_config(data, tmp_path / "a", method=method, save_every=3, keep_checkpoints=5))
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoints" / "step-0000003"
    resumed = Trainer(small_config(data, tmp_path / "b", method=method, resume=str(checkpoint)))
    resumed.train()
    assert resumed.step == 6
    for name, value in final_parameters(straight).items():
        torch.testing.assert_close(final_parameters(resumed)[name], value, rtol=0, atol=1e-6, msg=name)
    tail = [(r["step"], r["loss"], r.get("beta")) for r in read_metrics(tmp_path / "a")[3:]]
    assert [(r["step"], r["loss"], r.get("beta")) for r in read_metrics(tmp_path / "b")] == tail
    if method == "epsilon_dpo":
        assert resumed.loss_fn.controller.beta == straight.loss_fn.controller.beta != 0.1


def test_a_resume_into_another_output_directory_keeps_the_clock_and_says_what_its_summary_covers(data, tmp_path):
    """The train records' time counts the run's training time, across resumes (the checkpoint keeps it); in a
    new output directory the summary's train line says from which step it counts, and the held-out line
    gives the last evaluation (the first is in the old directory)."""
    settings = {"max_steps": 4, "save_every": 2, "eval_every": 2}
    Trainer(small_config(data, tmp_path / "a", **settings)).train()
    checkpoint = tmp_path / "a" / "checkpoints" / "step-0000002"
    state = load_checkpoint_state(checkpoint)
    logged = {r["step"]: r["time"] for r in read_metrics(tmp_path / "a")}
    assert state["elapsed"] >= logged[2] > 0
    config = small_config(data, tmp_path / "b", resume=str(checkpoint), **settings)
    summary = Trainer(config).train()
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [3, 4]
    assert all(r["time"] > state["elapsed"] for r in read_metrics(tmp_path / "b"))
    text = format_summary(summary, config)
    assert "(from step 3)" in text
    assert "held-out  loss " in text and "(step 4; earlier evaluations are not in this output directory)" in text
    assert "mean task reward 0.500 (1 = sorted)" in format_summary({**summary, "task_reward": (None, 0.5)}, config)

    del state["elapsed"]                                  # a checkpoint written before the time was kept
    write_checkpoint(checkpoint.parent, checkpoint.name, state, state["config"])
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step-0000004")
    Trainer(small_config(data, tmp_path / "a", resume="latest", **settings)).train()
    assert all(r["time"] > logged[2] for r in read_metrics(tmp_path / "a") if r["step"] > 2)


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_loadable(data, tmp_path, monkeypatch):
    trainer = Trainer(small_config(data, tmp_path, max_steps=4))
    trainer.train_step()
    good = trainer.save_checkpoint()
    trainer.train_step()
    real_save = torch.save

    def killed(obj, f, *args, **kwargs):
        real_save({"partial": True}, f)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    trainer.close()                                   # a killed process's lock on the directory goes with it
    monkeypatch.setattr(torch, "save", real_save)
    assert latest_checkpoint(tmp_path) == good
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith(".")) == [good.name]
    fresh = Trainer(small_config(data, tmp_path, max_steps=4, resume="latest"))
    fresh.load_checkpoint(latest_checkpoint(tmp_path))
    assert fresh.step == 1 and fresh.loader.state_dict()["position"] == 1


def test_a_non_finite_loss_stops_at_its_step_without_a_checkpoint(data, tmp_path, monkeypatch):
    trainer = Trainer(small_config(data, tmp_path, max_steps=6, save_every=2))
    real_forward = fdpo.PreferenceLoss.forward

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training and trainer.step == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(fdpo.PreferenceLoss, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"not finite \(nan\) at step 4 .*step-0000002"):
        trainer.train()
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-0000002"]
    state = torch.load(tmp_path / "checkpoints" / "step-0000002" / "state.pt", weights_only=False)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_cached_reference_gives_the_frozen_copys_losses(data, tmp_path):
    copy_run = Trainer(small_config(data, tmp_path / "copy", max_steps=3))
    copy_run.train()
    cache_dir = tmp_path / "cache"
    cached = Trainer(small_config(data, tmp_path / "cached", max_steps=3, reference="cache", cache_dir=str(cache_dir)))
    cached.train()
    files = sorted(cache_dir.glob("reference-*.pt"))
    assert len(files) == 2                               # train and eval data
    losses = [r["loss"] for r in read_metrics(tmp_path / "copy")]
    assert [r["loss"] for r in read_metrics(tmp_path / "cached")] == pytest.approx(losses, abs=1e-6)
    # a second run finds the stored sums: same key, nothing recomputed
    stamps = [f.stat().st_mtime_ns for f in files]
    again = Trainer(small_config(data, tmp_path / "again", max_steps=1, reference="cache", cache_dir=str(cache_dir)))
    assert [f.stat().st_mtime_ns for f in files] == stamps
    torch.testing.assert_close(again.reference.table, cached.reference.table, rtol=0, atol=0)
    with pytest.raises(ValueError, match="reference='cache' stores per-sequence sums"):
        Trainer(small_config(data, tmp_path / "x", method="tdpo", reference="cache"))


def test_gradient_accumulation_matches_one_large_batch(data, tmp_path):
    one = Trainer(small_config(data, tmp_path / "one", max_steps=2, batch_size=8))
    two = Trainer(small_config(data, tmp_path / "two", max_steps=2, batch_size=4, grad_accum=2))
    for _ in range(2):
        a, b = one.train_step(), two.train_step()
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for name, value in final_parameters(one).items():
        torch.testing.assert_close(final_parameters(two)[name], value, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_changes_memory_not_results(data, tmp_path):
    plain = Trainer(small_config(data, tmp_path / "plain", max_steps=2))
    checkpointed = Trainer(small_config(data, tmp_path / "ckpt", max_steps=2, gradient_checkpointing=True))
    def recomputes(trainer: Trainer) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in trainer.hf_model.modules())

    assert recomputes(checkpointed) and not recomputes(plain)
    for _ in range(2):
        a, b = plain.train_step(), checkpointed.train_step()
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def test_the_nll_term_is_weighted_into_train_and_eval_losses(data, tmp_path):
    assert TrainConfig().resolved_nll_weight() == 1.0                         # built-in model: learn to answer
    assert TrainConfig(model="some/model").resolved_nll_weight() == 0.0
    assert TrainConfig(method="tdpo").resolved_nll_weight() == 0.0
    plain = Trainer(small_config(data, tmp_path / "plain", max_steps=1))
    weighted = Trainer(small_config(data, tmp_path / "nll", max_steps=1, nll_weight=0.5))
    first, second = plain.evaluate(), weighted.evaluate()
    # at the start policy = reference: every pair loss is log 2, the NLL term is the mean per-token NLL
    assert first["loss"] == pytest.approx(math.log(2))
    nll = []
    for example in weighted.eval_examples:
        ids = torch.tensor([[*example.prompt, *example.chosen]])
        with torch.no_grad():
            logits = weighted.hf_model(ids).logits.double()[0, len(example.prompt) - 1:-1]
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(example.chosen).unsqueeze(-1))
        nll.append(-lp.mean().item())
    assert second["loss"] == pytest.approx(math.log(2) + 0.5 * sum(nll) / len(nll), rel=1e-5)
    assert weighted.train_step()["loss"] > plain.train_step()["loss"] + 1.0
    with pytest.raises(ValueError, match=r"nll_weight=1\.0 has no effect here: the NLL term applies to methods 'dpo' "
                       "and 'epsilon_dpo'"):
        Trainer(small_config(data, tmp_path / "t", method="tdpo", nll_weight=1.0))


def test_config_file_and_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("max-steps: 7\nbeta: 0.5\ndivergence: js\n", encoding="utf-8")
    config = parse_args(["--config", str(tmp_path / "c.yaml"), "--beta", "0.2", "--loss", "hinge"])
    assert (config.max_steps, config.beta, config.divergence, config.loss) == (7, 0.2, "js", "hinge")
    (tmp_path / "c.json").write_text(json.dumps({"divergence": "alpha", "alpha": 0.3, "packed": True}),
                                     encoding="utf-8")
    config = parse_args(["--config", str(tmp_path / "c.json")])
    assert (config.alpha, config.packed, config.max_steps) == (0.3, True, TrainConfig().max_steps)
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 1}), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'"):
        parse_args(["--config", str(tmp_path / "bad.json")])
    with pytest.raises(ValueError, match="max_steps must be an integer >= 1"):
        parse_args(["--max-steps", "0"])
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_cli_runs_and_reports_errors(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    status = main(["--data", str(data["train"]), "--eval-data", str(data["eval"]), "--output-dir", str(out),
                   "--max-steps", "2", "--batch-size", "8", "--no-progress", "--backend", "torch",
                   "--divergence", "alpha", "--alpha", "0.4", "--loss", "robust", "--label-smoothing", "0.1"])
    printed = capsys.readouterr().out
    assert status == 0 and "fdpo.train: 2 steps" in printed and "divergence alpha, loss robust" in printed
    assert threads == [1]                                         # the built-in model runs on one thread
    assert len(read_metrics(out, "eval")) == 2
    assert main(["--data", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "new")]) == 1
    assert "missing.jsonl' does not exist" in capsys.readouterr().err
    assert main(["--data", str(data["train"]), "--divergence", "kl", "--output-dir", str(tmp_path / "new")]) == 1
    assert "divergence must be one of" in capsys.readouterr().err
    assert main(["--max-steps", "0"]) == 1
    assert "max_steps must be an integer >= 1, got 0" in capsys.readouterr().err


def test_the_error_line_is_one_write(monkeypatch):
    """Every process of a distributed run prints its error to the same stderr: the line and its newline go
    out in one write, or one process's line runs into another's."""
    writes = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    monkeypatch.setattr(sys, "stderr", Recorder())
    assert main(["--max-steps", "0"]) == 1
    assert writes == ["fdpo.train: error: max_steps must be an integer >= 1, got 0\n"]


def test_bad_settings_raise_clear_errors(data, tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        Trainer(small_config(data, tmp_path, method="ppo"))
    with pytest.raises(ValueError, match="fewer than one batch"):
        Trainer(small_config(data, tmp_path, batch_size=128))
    with pytest.raises(ValueError, match="holds no intact checkpoint"):
        Trainer(small_config(data, tmp_path / "empty", resume="latest")).train()


def test_packed_batches_train_like_padded_ones(data, tmp_path):
    padded = Trainer(small_config(data, tmp_path / "padded", max_steps=3))
    packed = Trainer(small_config(data, tmp_path / "packed", max_steps=3, packed=True))
    assert packed.loader.next_batch().cu_seqlens is not None
    packed.loader.load_state_dict(padded.loader.state_dict())
    for _ in range(3):
        a, b = padded.train_step(), packed.train_step()
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert packed.evaluate()["loss"] == pytest.approx(padded.evaluate()["loss"], abs=1e-5)
    for name, value in final_parameters(padded).items():
        torch.testing.assert_close(final_parameters(packed)[name], value, rtol=1e-4, atol=1e-5)


def tdpo_loss64(policy, reference, examples, beta: float, alpha: float) -> float:
    """TDPO2's loss from the two models' float64 logits: softplus(-beta u) with
    u = (a_w - b_w) - (a_l - b_l) - alpha (K_l - K_w), a/b the response log-prob sums of policy and
    reference, K the response sums of KL(ref || policy) per token, averaged over pairs."""
    policy, reference = copy.deepcopy(policy).double(), copy.deepcopy(reference).double()
    losses = []
    for example in examples:
        sums = {}
        for side in ("chosen", "rejected"):
            response = list(getattr(example, side))
            ids = torch.tensor([[*example.prompt, *response]])
            scored = slice(len(example.prompt) - 1, ids.shape[1] - 1)
            with torch.no_grad():
                lp = torch.log_softmax(policy(ids).logits[0, scored], -1)
                lp_ref = torch.log_softmax(reference(ids).logits[0, scored], -1)
            labels = torch.tensor(response).unsqueeze(-1)
            kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1).sum()
            sums[side] = (lp.gather(-1, labels).sum(), lp_ref.gather(-1, labels).sum(), kl)
        (a_w, b_w, k_w), (a_l, b_l, k_l) = sums["chosen"], sums["rejected"]
        u = (a_w - b_w) - (a_l - b_l) - alpha * (k_l - k_w)
        losses.append(torch.nn.functional.softplus(-beta * u).item())
    return sum(losses) / len(losses)


def test_tdpo_token_divergence_reaches_the_loss(data, tmp_path):
    config = parse_args(["--method", "tdpo", "--token-divergence", "js", "--token-beta", "0.3"])
    assert (config.token_divergence, config.token_alpha, config.token_beta) == ("js", 0.5, 0.3)
    spec = build_loss(config).token_divergence
    assert (spec.name, spec.param) == ("js", 0.3)
    kl = {}
    for divergence in ("forward_kl", "js"):
        out = tmp_path / divergence
        Trainer(small_config(data, out, method="tdpo", max_steps=4, lr=5e-3, token_divergence=divergence)).train()
        kl[divergence] = read_metrics(out, "eval")[-1]["kl"]
    assert all(math.isfinite(value) and value > 0 for value in kl.values())
    assert kl["js"] != pytest.approx(kl["forward_kl"], rel=1e-3)


def test_the_trainer_optimizes_tdpo_as_defined(data, tmp_path):
    trainer = Trainer(small_config(data, tmp_path, method="tdpo", max_steps=6, beta=1.0, lr=5e-3))
    before = trainer.evaluate()["loss"]
    assert before == pytest.approx(math.log(2), abs=1e-6)                  # policy = reference
    for _ in range(6):
        trainer.train_step()
    after = trainer.evaluate()["loss"]
    want = tdpo_loss64(trainer.hf_model, trainer.reference.lm.model, trainer.eval_examples, beta=1.0, alpha=0.5)
    assert after == pytest.approx(want, rel=1e-5)
    assert after < before - 0.01


def test_train_records_hold_the_fraction_of_pairs_a_clamp_silences(data, tmp_path, monkeypatch):
    """dpo with BPO at beta 200 (margins past the clamp at -60 for some pairs): each train record's `clamped`
    is the mean of its micro-batches' pair-loss flags; tdpo, which has no clamp, logs none."""
    from fdpo.train.objective import PreferenceModel

    flags = []
    forward = PreferenceModel.forward

    def recording(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training and "clamped" in out.extras:
            flags.append(out.extras["clamped"].mean().item())
        return out

    monkeypatch.setattr(PreferenceModel, "forward", recording)
    Trainer(small_config(data, tmp_path / "bpo", max_steps=3, grad_accum=2, loss="bpo", beta=200.0)).train()
    logged = [r["clamped"] for r in read_metrics(tmp_path / "bpo")]
    assert logged == pytest.approx([(a + b) / 2 for a, b in zip(flags[::2], flags[1::2], strict=True)], abs=1e-12)
    assert 0 < max(logged) and min(logged) < 1
    Trainer(small_config(data, tmp_path / "tdpo", max_steps=1, method="tdpo")).train()
    assert "clamped" not in read_metrics(tmp_path / "tdpo")[0]


def test_a_resume_from_the_final_checkpoint_keeps_the_final_samples_record(tmp_path):
    """The built-in task's greedy-answer record of the last step is written before the final checkpoint:
    a run resumed from it with a higher --max-steps keeps that record, and a finished run resumed as it
    is does not log its last step's record twice."""
    out = tmp_path / "run"
    settings = {"output_dir": str(out), "max_steps": 2, "batch_size": 8, "eval_every": 0, "save_every": 0,
                "backend": "torch", "progress": False, "sample_prompts": 2}
    Trainer(TrainConfig(**settings)).train()
    first = read_metrics(out, "samples")
    assert [r["step"] for r in first] == [0, 2]
    settings.update(max_steps=3, resume="latest")
    Trainer(TrainConfig(**settings)).train()
    resumed = read_metrics(out, "samples")
    assert [r["step"] for r in resumed] == [0, 2, 3] and resumed[:2] == first
    summary = Trainer(TrainConfig(**settings)).train()
    assert read_metrics(out, "samples") == resumed
    assert summary["task_reward"] == (first[0]["task_reward"], resumed[2]["task_reward"])


def test_an_epsilon_dpo_train_record_has_the_beta_that_scored_its_step_and_the_next_one(data, tmp_path):
    trainer = Trainer(small_config(data, tmp_path, method="epsilon_dpo", epsilon=0.3))
    controller = trainer.loss_fn.controller
    for _ in range(2):
        before = controller.beta
        metrics = trainer.train_step()
        assert metrics["beta"] == before and metrics["next_beta"] == controller.beta
    assert controller.beta != 0.1


def test_the_summary_reads_the_records_of_this_version_and_of_earlier_ones(data, tmp_path):
    """Records written before `next_beta` and `chosen_logratio` (then `beta` after the update and
    `kl_estimate`) still give the summary's final beta and log-ratio line."""
    config = small_config(data, tmp_path, method="epsilon_dpo", reference="cache")
    train = {"step": 6, "split": "train", "loss": 0.6, "accuracy": 0.5}
    evaluation = {"step": 6, "split": "eval", "loss": 0.6, "accuracy": 0.5, "margin": 0.1, "entropy": 2.0,
                  "ece": 0.1}
    summary = {"steps": 6, "steps_this_call": 6, "resumed_from": None, "seconds": 1.0, "first_train": train,
               "first_eval": None, "notes": [], "output_dir": "run", "checkpoint": "run/checkpoints/step-0000006",
               "model": "run/final"}
    for names in ({"beta": 0.011, "next_beta": 0.012, "chosen_logratio": 0.25}, {"beta": 0.012, "kl_estimate": 0.25}):
        last_train = {**train, **{k: v for k, v in names.items() if "beta" in k}}
        last_eval = {**evaluation, **{k: v for k, v in names.items() if "beta" not in k}}
        text = format_summary({**summary, "last_train": last_train, "last_eval": last_eval}, config)
        assert "epsilon-DPO beta 0.1 -> 0.01200" in text and "chosen log-ratio to the reference 0.2500" in text


def test_a_checkpoint_holds_each_processs_random_state_and_one_written_before_still_resumes(data, tmp_path):
    trainer = Trainer(small_config(data, tmp_path, max_steps=2))
    trainer.train_step()
    state = trainer.state()
    assert state["world_size"] == 1 and len(state["rng"]) == 1
    older = {key: value for key, value in state.items() if key != "world_size"}
    older["rng"] = state["rng"][0]                     # rank 0's state alone, as checkpoints held it before
    for restored in (state, older):
        torch.manual_seed(123)
        trainer.restore(restored)
        assert torch.equal(torch.get_rng_state(), state["rng"][0]["torch"])


def test_a_torchrun_worker_ends_inside_main_whatever_it_raised(monkeypatch, capsys):
    """A worker (WORLD_SIZE > 1) ends its process inside main, trainer still referenced, with status 1 and
    the traceback of an unexpected exception; a single process gets the exception itself."""
    import fdpo.train.cli as cli

    class Failing:
        def __init__(self, config):
            raise RuntimeError("boom")

    ended = []
    monkeypatch.setattr(cli, "Trainer", Failing)
    monkeypatch.setattr(cli, "exit_without_finalization", lambda status: ended.append(status))
    with pytest.raises(RuntimeError, match="boom"):
        main(["--max-steps", "1"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--max-steps", "1"]) == 1 and ended == [1]
    assert "RuntimeError: boom" in capsys.readouterr().err


def test_a_processs_gpu_is_made_its_current_device(monkeypatch):
    """NCCL's object collectives stage their bytes on the current device: each process sets its own."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    process = type("Process", (), {"config": TrainConfig(max_steps=1)})()
    assert Trainer._device(process) == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    process.config = TrainConfig(max_steps=1, device="cuda")    # no index: the local rank's GPU
    assert Trainer._device(process) == torch.device("cuda", 1) and current[-1] == torch.device("cuda", 1)
    process.config = TrainConfig(max_steps=1, device="cpu")
    assert Trainer._device(process) == torch.device("cpu") and len(current) == 2


def test_a_process_checkpoints_and_restores_its_own_gpus_random_state(monkeypatch):
    """One GPU's generator per process (a resume that sees fewer GPUs restores it too); a checkpoint that
    holds every visible GPU's (as before) gives the process its own device's."""
    import fdpo.train.checkpoint as checkpoint

    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([device.index]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state), device)))
    gpu = torch.device("cuda", 1)
    state = checkpoint.rng_state(gpu)
    assert torch.equal(state["cuda"], torch.tensor([1]))
    checkpoint.set_rng_state(state, gpu)
    checkpoint.set_rng_state({**state, "cuda": [torch.tensor([7]), torch.tensor([8])]}, gpu)
    checkpoint.set_rng_state({**state, "cuda": [torch.tensor([7])]}, gpu)   # saved where it saw one GPU
    checkpoint.set_rng_state(state, torch.device("cpu"))
    assert restored == [(1, gpu), (8, gpu)]
    assert "cuda" not in checkpoint.rng_state(torch.device("cpu"))


def test_the_held_out_accuracy_is_a_count_over_the_pairs(tmp_path):
    """1 of 3 held-out pairs right is 1/3 exactly, not the float32 mean 0.3333333432674408."""
    paths = write_data(tmp_path, train=16, evaluation=3)
    trainer = Trainer(small_config(paths, tmp_path / "run", max_steps=1))
    score = trainer.module.forward

    def forward(*args, **kwargs):
        out = score(*args, **kwargs)
        out.margins = torch.tensor([1.0, -1.0, -2.0])[:out.margins.numel()]
        return out

    trainer.module.forward = forward
    assert trainer.evaluate()["accuracy"] == 1 / 3


def test_a_training_steps_reductions_go_through_the_processs_device_under_nccl(data, tmp_path, monkeypatch):
    """NCCL reduces CUDA tensors only: every reduction of a step goes through `_all_reduce`, which stages a
    CPU tensor on the process's device and brings the result back."""
    import torch.distributed as dist

    class Staged:
        def __init__(self, device):
            self.device = device

        def to(self, device):
            return Staged(device)

    reduced = []
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: reduced.append(tensor.device))
    process = type("Process", (), {"world_size": 2, "device": torch.device("cuda", 1)})()
    assert Trainer._all_reduce(process, Staged(torch.device("cpu"))).device == torch.device("cpu")
    assert reduced == [torch.device("cuda", 1)]

    trainer = Trainer(small_config(data, tmp_path, max_steps=1))
    monkeypatch.setattr(dist, "all_reduce", lambda *args, **kwargs: pytest.fail("a reduction outside _all_reduce"))
    through = []
    monkeypatch.setattr(trainer, "_all_reduce", lambda values, op=None: through.append(op) or values)
    trainer.world_size = 2
    trainer.train_step()
    assert dist.ReduceOp.MIN in through and dist.ReduceOp.MAX in through and None in through


def test_a_micro_batch_reads_the_host_only_in_its_forward_and_its_finite_check(data, tmp_path):
    """A step's metrics are summed on the device: a micro-batch adds no host read of its own (on a GPU each
    read after the backward would wait for it before the next forward is queued) besides its forward's
    and the finite-loss check's."""
    from test_host_syncs import HostReads

    from fdpo.train.objective import batch_inputs

    trainer = Trainer(small_config(data, tmp_path, grad_accum=2))
    reads = []
    for accumulate in (1, 2):
        trainer.config.grad_accum = accumulate
        trainer.train_step()
        with HostReads() as recorded:
            trainer.train_step()
        reads.append(len(recorded.found))
    batch = trainer.loader.next_batch().to(trainer.device)
    with HostReads() as forward:
        trainer.module(**batch_inputs(batch), **trainer.reference.loss_inputs(batch))
    assert reads[1] - reads[0] == len(forward.found) + 1

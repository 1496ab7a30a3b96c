"""The trainer keeps a run's state and results truthful: resumes that change the optimizer's settings,
dropout models, checkpoints from elsewhere, other reference weights, bf16-stored models, autocast,
config files with strings for booleans, and kills between the renames that replace a checkpoint."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fdpo.train import TrainConfig, Trainer, parse_args
from fdpo.train.checkpoint import (
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint_state,
    prune,
    verify_checkpoint,
    write_checkpoint,
)
from fdpo.train.models import model_config, tiny_llama
from fdpo.train.rundir import ABSENT, ADDED_FIELDS, RunDirectoryError, mismatched_fields
from fdpo.train.tokenizer import byte_tokenizer

from train_setup import read_metrics, small_config, write_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


def contents(out) -> dict[str, bytes]:
    """Every file under out with its bytes, but the lock file (it names the process that last held out)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def tree(out) -> dict[str, int]:
    """Every file under out with its size: a snapshot to prove a refused run changed nothing."""
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}


def checkpoints(out) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) if root.is_dir() else []


def save_model(directory, model) -> str:
    """save_pretrained of `model` and the byte tokenizer into directory; returns its path as a string."""
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return str(directory)


# -- 1. a resume applies a new learning rate and weight decay ------------------------------------------------------


def test_resume_applies_a_changed_lr_and_weight_decay(data, tmp_path):
    settings = {"schedule": "constant", "warmup_steps": 0, "save_every": 1}
    Trainer(small_config(data, tmp_path, max_steps=2, lr=1e-3, **settings)).train()
    resumed = Trainer(small_config(data, tmp_path, max_steps=4, lr=1e-2, weight_decay=0.5, resume="latest",
                                   **settings))
    summary = resumed.train()
    assert [r["lr"] for r in read_metrics(tmp_path)] == pytest.approx([1e-3, 1e-3, 1e-2, 1e-2], rel=1e-12)
    for group in resumed.optimizer.param_groups:
        assert (group["lr"], group["initial_lr"], group["weight_decay"]) == (1e-2, 1e-2, 0.5)
    assert resumed.scheduler.base_lrs == [1e-2] * len(resumed.optimizer.param_groups)
    changed = json.loads((tmp_path / "run.json").read_text())["resumes"][-1]["changed"]
    assert changed["lr"] == [1e-3, 1e-2] and changed["weight_decay"] == [0.0, 0.5]
    assert any("lr 0.001 -> 0.01" in note for note in summary["notes"])


# -- 2. dropout is on while training, whether or not an evaluation ran first ---------------------------------------


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory) -> str:
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128, resid_pdrop=0.3,
                        embd_pdrop=0.3, attn_pdrop=0.3, tie_word_embeddings=False,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return save_model(tmp_path_factory.mktemp("gpt2_dropout"), GPT2LMHeadModel(config))


def test_a_dropout_model_trains_in_train_mode_and_resumes_exactly(data, tmp_path, dropout_model):
    modes = []

    def run(out, **overrides) -> Trainer:
        trainer = Trainer(small_config(data, out, model=dropout_model, max_steps=4, **overrides))
        step = trainer.train_step

        def spy():
            modes.append(trainer.hf_model.training)
            return step()

        trainer.train_step = spy
        trainer.train()
        return trainer

    run(tmp_path / "straight", save_every=2, keep_checkpoints=5)
    run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoints" / "step-0000002"))
    run(tmp_path / "no_eval", eval_data=None)
    assert modes == [True] * 10
    straight = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "straight")][2:]
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "resumed")] == straight


# -- 3. checkpoints of another history are never mixed in or pruned away -------------------------------------------


def test_resuming_a_copied_checkpoint_refuses_newer_ones_in_the_run(data, tmp_path):
    out, backup = tmp_path / "run", tmp_path / "backup"
    Trainer(small_config(data, out, max_steps=6, save_every=2, keep_checkpoints=5)).train()
    shutil.copytree(out / "checkpoints" / "step-0000002", backup / "step-0000002")
    before = tree(out)
    with pytest.raises(RunDirectoryError, match=r"holds checkpoints newer than step-0000002 \(step-0000004, "
                                                r"step-0000006\).*mix two histories"):
        Trainer(small_config(data, out, max_steps=6, resume=str(backup / "step-0000002"))).train()
    assert tree(out) == before


def test_prune_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"step-{step:07d}").mkdir()
    prune(tmp_path, 2, written=tmp_path / "step-0000004")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000004", "step-0000006"]
    prune(tmp_path, 1, written=tmp_path / "step-0000004")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000004"]


def test_checkpoints_are_ordered_by_step_number_past_the_zero_padding(data, tmp_path):
    """step-10000000 is newer than step-9999999 (their names sort the other way): for 'latest', pruning and
    the refusal of a resume while a newer step exists."""
    out = tmp_path / "run"
    Trainer(small_config(data, out, max_steps=1, save_every=1)).train()
    root = out / "checkpoints"
    state = load_checkpoint_state(root / "step-0000001")
    config = json.loads((root / "step-0000001" / "config.json").read_text())
    for step in (9_999_999, 10_000_000):
        write_checkpoint(root, f"step-{step:07d}", {**state, "step": step}, config)
    (root / "step-latest").mkdir()                                           # not a checkpoint name
    assert [p.name for p in checkpoint_dirs(root)] == ["step-0000001", "step-9999999", "step-10000000"]
    assert latest_checkpoint(out).name == "step-10000000"
    before = tree(out)
    with pytest.raises(RunDirectoryError, match=r"holds checkpoints newer than step-9999999 \(step-10000000\)"):
        Trainer(small_config(data, out, max_steps=10_000_000, resume=str(root / "step-9999999"))).train()
    assert tree(out) == before
    prune(root, 2, written=root / "step-0000001")
    assert sorted(p.name for p in checkpoint_dirs(root)) == ["step-0000001", "step-10000000"]


# -- 4. the reference's weights are part of the run's identity ----------------------------------------------------


def test_resume_refuses_a_model_with_other_weights(data, tmp_path):
    model_dir = tmp_path / "model"
    save_model(model_dir, tiny_llama(0))
    out = tmp_path / "run"
    Trainer(small_config(data, out, model=str(model_dir), max_steps=2, save_every=1)).train()
    Trainer(small_config(data, out, model=str(model_dir), max_steps=3, resume="latest")).train()
    tiny_llama(123).save_pretrained(model_dir)
    before = tree(out)
    with pytest.raises(RunDirectoryError, match=r"settings that define its state differ \(model_weights '"):
        Trainer(small_config(data, out, model=str(model_dir), max_steps=4, resume="latest")).train()
    assert tree(out) == before


def test_resume_refuses_a_model_with_another_configuration(data, tmp_path, monkeypatch):
    """Same weights, config.json edited (rope base, norm epsilon, attention dropout): another function, refused
    naming the entry. Entries that change nothing computed (version, cache, stored dtype, generation's token ids)
    may change, and so may the configuration class: a transformers version that adds a field with its default."""
    from transformers import LlamaConfig

    model_dir = tmp_path / "model"
    save_model(model_dir, tiny_llama(0))
    out = tmp_path / "run"
    Trainer(small_config(data, out, model=str(model_dir), max_steps=2, save_every=1)).train()
    recorded = json.loads((out / "run.json").read_text())["fields"]["model_config"]
    assert recorded["hidden_size"] == 64 and "attention_dropout" not in recorded and "eos_token_id" not in recorded
    path = model_dir / "config.json"
    original = json.loads(path.read_text())
    harmless = {**original, "transformers_version": "0.0.1", "use_cache": not original["use_cache"],
                "dtype": "bfloat16", "eos_token_id": [258, 257]}
    path.write_text(json.dumps(harmless))
    real_init = LlamaConfig.__init__

    def upgraded_init(self, *args, upgrade_field: bool = False, **kwargs):
        real_init(self, *args, **kwargs)
        self.upgrade_field = upgrade_field

    monkeypatch.setattr(LlamaConfig, "__init__", upgraded_init)
    Trainer(small_config(data, out, model=str(model_dir), max_steps=3, resume="latest")).train()
    monkeypatch.setattr(LlamaConfig, "__init__", real_init)
    for edit, named in (({"rope_parameters": {**original["rope_parameters"], "rope_theta": 50.0}},
                         "model_config.rope_parameters.rope_theta the class default -> 50.0"),
                        ({"rms_norm_eps": 0.001}, "model_config.rms_norm_eps the class default -> 0.001"),
                        ({"attention_dropout": 0.5}, "model_config.attention_dropout the class default -> 0.5")):
        path.write_text(json.dumps({**harmless, **edit}))
        before = tree(out)
        with pytest.raises(RunDirectoryError) as caught:
            Trainer(small_config(data, out, model=str(model_dir), max_steps=4, resume="latest")).train()
        message = str(caught.value)
        assert f"settings that define its state differ ({named}); resume" in message and "hidden_size" not in message
        assert tree(out) == before
    stored = json.loads((out / "run.json").read_text())["fields"]
    recorded_before = {name: value for name, value in stored.items() if name != "model_config"}
    other = {**stored, "model_config": {**recorded, "rms_norm_eps": 0.1}}
    assert mismatched_fields(recorded_before, other) == {}
    assert mismatched_fields({**stored, "model_config": "a digest recorded before the entries"}, other) == {}
    assert mismatched_fields(stored, other) == {"model_config.rms_norm_eps": (ABSENT, 0.1)}
    edited = {**stored, "model_config": {**recorded, "rms_norm_eps": 0.2}}
    assert mismatched_fields(other, edited) == {"model_config.rms_norm_eps": (0.1, 0.2)}


class ConfiguredModel(torch.nn.Module):
    """A module that only holds a transformers configuration: what `model_config` reads."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config


def test_a_composite_configuration_compares_its_sub_configuration_with_its_own_class(monkeypatch):
    """A Llava configuration with a Mistral text_config (LlavaConfig() builds a Llama one): a field that a
    transformers version adds to MistralConfig with its default changes no entry, so the run resumes; an
    edited text_config entry, or a text_config of another class, is still refused naming the entry."""
    from transformers import LlavaConfig, MistralConfig

    text = {"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 300}

    def identity(**edit) -> dict:
        """The identity fields of a run of the Llava model whose text_config is `text` edited by `edit`."""
        config = LlavaConfig(text_config={**text, **edit})
        return {**ADDED_FIELDS, "model_config": model_config(ConfiguredModel(config))}

    recorded = json.loads(json.dumps(identity()))
    assert recorded["model_config"]["text_config.model_type"] == "mistral"
    real_init = MistralConfig.__init__

    def upgraded_init(self, *args, upgrade_field: float = 0.0, **kwargs):
        real_init(self, *args, **kwargs)
        self.upgrade_field = upgrade_field

    monkeypatch.setattr(MistralConfig, "__init__", upgraded_init)
    assert mismatched_fields(recorded, identity()) == {}
    assert mismatched_fields(recorded, identity(rms_norm_eps=0.001)) == {
        "model_config.text_config.rms_norm_eps": (ABSENT, 0.001)}
    assert mismatched_fields(recorded, identity(upgrade_field=0.5)) == {
        "model_config.text_config.upgrade_field": (ABSENT, 0.5)}
    assert "model_config.text_config.model_type" in mismatched_fields(recorded, identity(model_type="llama"))


def test_resume_refuses_a_checkpoint_past_max_steps(data, tmp_path):
    """A lowered --max-steps would neither train nor say so, and would write the checkpoint again."""
    Trainer(small_config(data, tmp_path, max_steps=3, save_every=1)).train()
    before = contents(tmp_path)
    with pytest.raises(RunDirectoryError, match="is at step 3, past --max-steps 2: raise --max-steps"):
        Trainer(small_config(data, tmp_path, max_steps=2, resume="latest")).train()
    assert contents(tmp_path) == before
    assert Trainer(small_config(data, tmp_path, max_steps=3, resume="latest")).train()["steps"] == 3


# -- 5. a model stored in bf16 trains on float32 master weights ----------------------------------------------------


def test_a_bf16_stored_model_trains_on_float32_weights(data, tmp_path):
    model_dir = tmp_path / "model"
    save_model(model_dir, tiny_llama(0).to(torch.bfloat16))
    trainer = Trainer(small_config(data, tmp_path / "run", model=str(model_dir), lr=1e-6, warmup_steps=0,
                                   schedule="constant", eval_data=None))
    assert {p.dtype for p in trainer.hf_model.parameters()} == {torch.float32}
    before = {name: p.detach().clone() for name, p in trainer.hf_model.named_parameters()}
    for _ in range(2):
        trainer.train_step()
    moved, updated = 0, 0
    for name, parameter in trainer.hf_model.named_parameters():
        moment = trainer.optimizer.state[parameter]["exp_avg"]
        assert moment.dtype == torch.float32, name
        updated += int((moment != 0).sum())
        moved += int(((parameter != before[name]) & (moment != 0)).sum())
    assert moved == updated > 0.5 * sum(p.numel() for p in before.values())


# -- 6. the reference runs under the policy's autocast -------------------------------------------------------------


@pytest.mark.parametrize("reference", ["copy", "cache"])
def test_under_autocast_a_policy_equal_to_its_reference_has_zero_rewards(data, tmp_path, monkeypatch, reference):
    monkeypatch.setattr(Trainer, "_autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    trainer = Trainer(small_config(data, tmp_path, max_steps=1, reference=reference))
    evaluation = trainer.evaluate()
    assert evaluation["margin"] == 0.0 and evaluation["accuracy"] == 0.0
    assert evaluation["kl" if reference == "copy" else "chosen_logratio"] == 0.0
    trainer.optimizer.param_groups[0]["lr"] = 0.0
    metrics = trainer.train_step()
    assert (metrics["chosen_reward"], metrics["rejected_reward"], metrics["margin"]) == (0.0, 0.0, 0.0)


# -- 7. settings are checked, booleans included, before anything is deleted ----------------------------------------


@pytest.mark.parametrize("name", ["overwrite", "packed", "bf16", "progress", "gradient_checkpointing"])
def test_a_string_for_a_boolean_setting_is_refused(tmp_path, name):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({name: "false"}))
    with pytest.raises(ValueError, match=f"^{name} must be true or false .*got 'false'"):
        parse_args(["--config", str(config)])


@pytest.mark.parametrize("settings, named", [
    ({"max_grad_norm": math.nan}, "max_grad_norm must be a finite number >= 0"),
    ({"max_grad_norm": math.inf}, "max_grad_norm must be a finite number >= 0"),
    ({"weight_decay": math.nan}, "weight_decay must be a finite number >= 0"),
    ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
    ({"label_smoothing": 0.7}, r"label_smoothing must be a number in \[0, 0.5\)"),
    ({"divergence": "alpha", "alpha": math.nan}, r"alpha must be a number in the open interval \(0, 1\)"),
    ({"divergence": "alpha", "alpha": 1.0}, r"alpha must be a number in the open interval \(0, 1\)"),
    ({"method": "tdpo", "alpha": -1.0}, "alpha must be a finite number > 0"),
    ({"method": "epsilon_dpo", "epsilon": 1.5}, r"epsilon must be a number in the open interval \(0, 1\)"),
    ({"method": "tdpo", "token_divergence": "alpha", "token_alpha": 2.0}, r"token_alpha must be a number in \[0, 1\]"),
    ({"method": "tdpo", "token_divergence": "js", "token_beta": math.nan}, r"token_beta must be a number in \[0, 1\]"),
    ({"nll_weight": -1.0}, "nll_weight must be None or a finite number >= 0"),
    ({"max_prompt_length": 0}, "max_prompt_length must be None or an integer >= 1"),
    ({"seed": -3}, "seed must be an integer >= 0"),
    ({"lr": True}, "lr must be a finite number > 0"),
])
def test_numeric_settings_are_checked_by_validate(settings, named):
    with pytest.raises(ValueError, match=f"^{named}"):
        TrainConfig(**settings).validate()


@pytest.mark.parametrize("settings", [{"label_smoothing": 0.7}, {"data": "missing.jsonl"}])
def test_overwrite_deletes_nothing_when_the_run_cannot_start(data, tmp_path, settings):
    out = tmp_path / "run"
    Trainer(small_config(data, out, max_steps=1)).train()
    before = tree(out)
    with pytest.raises((ValueError, FileNotFoundError)):
        Trainer(small_config(data, out, max_steps=1, overwrite=True, **settings))
    assert tree(out) == before


# -- 8. a kill between the two renames that replace a checkpoint loses neither copy --------------------------------


@pytest.mark.parametrize("new_copy", ["complete", "partial"])
def test_a_checkpoint_moved_aside_by_a_killed_replacement_is_restored(data, tmp_path, new_copy):
    Trainer(small_config(data, tmp_path, max_steps=2)).train()
    root = tmp_path / "checkpoints"
    state = (root / "step-0000002" / "state.pt").read_bytes()
    aside, new = root / ".tmp-old-step-0000002-4242", root / ".tmp-step-0000002-4242"
    shutil.copytree(root / "step-0000002", new)
    os.replace(root / "step-0000002", aside)
    if new_copy == "partial":
        (new / "state.pt").write_bytes(state[:len(state) // 2])
    trainer = Trainer(small_config(data, tmp_path, max_steps=2, resume="latest"))
    assert checkpoints(tmp_path) == ["step-0000002"]
    verify_checkpoint(root / "step-0000002")
    assert not aside.exists() and not new.exists()
    source = new if new_copy == "complete" else aside
    assert any(f"restored {root / 'step-0000002'} from {source}" in note for note in trainer.notes)
    trainer.train()
    assert trainer.resumed_from == root / "step-0000002"


# -- the final model is replaced atomically -----------------------------------------------------------------------


def test_a_kill_while_saving_the_final_model_leaves_the_previous_one_whole(data, tmp_path, monkeypatch):
    Trainer(small_config(data, tmp_path, max_steps=1)).train()
    before = contents(tmp_path / "final")
    trainer = Trainer(small_config(data, tmp_path, max_steps=2, resume="latest"))

    def killed(directory, **kwargs):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "model.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt("killed while saving the final model")

    monkeypatch.setattr(trainer.hf_model, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert contents(tmp_path / "final") == before
    monkeypatch.undo()
    resumed = Trainer(small_config(data, tmp_path, max_steps=2, resume="latest"))
    assert any("left by an interrupted write" in note and "final" in note for note in resumed.notes)
    resumed.train()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    assert contents(tmp_path / "final") != before


@pytest.mark.parametrize("new_copy", [True, False])
def test_a_final_model_moved_aside_by_a_killed_replacement_is_restored(data, tmp_path, new_copy):
    Trainer(small_config(data, tmp_path, max_steps=1)).train()
    before = contents(tmp_path / "final")
    aside, new = tmp_path / ".tmp-old-final-4242", tmp_path / ".tmp-final-4242"
    if new_copy:
        shutil.copytree(tmp_path / "final", new)
    os.replace(tmp_path / "final", aside)
    trainer = Trainer(small_config(data, tmp_path, max_steps=1, resume="latest"))
    assert contents(tmp_path / "final") == before
    assert not aside.exists() and not new.exists()
    assert any(f"restored {tmp_path / 'final'} from {new if new_copy else aside}" in note for note in trainer.notes)

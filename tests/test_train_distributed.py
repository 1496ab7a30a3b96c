"""DDP and FSDP2 (`fully_shard`) on CPU with gloo: 2 processes under torchrun, same losses as one.

Each run is the real command line (`torchrun --nproc-per-node 2 -m fdpo.train ...`) on the same
global batches of 8 pairs (4 per process). The tolerance, 1e-5 absolute on every logged loss and
on the saved weights, covers the different float summation orders of the gradient all-reduce
(observed differences are around 1e-7).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fdpo.train.tasks import generate

TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    splits = generate()
    for split, size in (("train", 64), ("eval", 16)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in splits[split][:size]),
                                            encoding="utf-8")
    common = ["-m", "fdpo.train", "--data", str(root / "train.jsonl"), "--eval-data", str(root / "eval.jsonl"),
              "--max-steps", "4", "--batch-size", "8", "--warmup-steps", "1", "--log-every", "1", "--save-every", "2",
              "--backend", "torch", "--no-progress", "--method", "tdpo"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    commands = {"single": [sys.executable, *common],
                "ddp": [*torchrun, "--master-port", str(free_port()), *common, "--engine", "ddp"],
                "fsdp": [*torchrun, "--master-port", str(free_port()), *common, "--engine", "fsdp"]}
    outputs = {}
    for name, command in commands.items():
        outputs[name] = root / name
        done = subprocess.run([*command, "--output-dir", str(outputs[name])], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return outputs


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_give_the_losses_of_one(runs, engine):
    single, parallel = metrics(runs["single"]), metrics(runs[engine])
    assert [(r["step"], r["split"]) for r in parallel] == [(r["step"], r["split"]) for r in single]
    assert len(single) == 6                                  # eval, 4 train steps, eval
    for one, two in zip(single, parallel, strict=True):
        for key in ("loss", "accuracy", "margin", "kl", "entropy"):
            if key in one:
                assert two[key] == pytest.approx(one[key], abs=TOLERANCE), (engine, one["step"], key)
    assert single[-1]["loss"] < single[0]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_the_saved_model_is_the_one_process_model(runs, engine):
    want = load_file(runs["single"] / "final" / "model.safetensors")
    got = load_file(runs[engine] / "final" / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=TOLERANCE, msg=name)


INJECTED_FAILURES = {
    # torch.save of a checkpoint's state (a full disk, as torch reports it)
    "checkpoint": "import torch\n"
                  "real = torch.save\n"
                  "def full(obj, f, *args, **kwargs):\n"
                  "    if str(f).endswith('state.pt'):\n"
                  "        raise RuntimeError('[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed "
                  "writing file data/3: file write failed')\n"
                  "    return real(obj, f, *args, **kwargs)\n"
                  "torch.save = full\n",
    # the final model's safetensors file (read by transformers' save_pretrained)
    "final": "import safetensors.torch\n"
             "def full(*args, **kwargs):\n"
             "    raise OSError(28, 'No space left on device')\n"
             "safetensors.torch.save_file = full\n",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(INJECTED_FAILURES))
def test_a_write_the_first_process_fails_stops_every_process_with_its_one_line_error(tmp_path, kind):
    """A checkpoint or the final model cannot be written on rank 0 only (a full disk, injected through
    sitecustomize): both processes stop at once with the one-line "cannot write" error, none waits for
    the other or loses its connection to it."""
    inject = tmp_path / "inject"
    inject.mkdir()
    body = "".join(f"    {line}\n" for line in INJECTED_FAILURES[kind].splitlines())
    (inject / "sitecustomize.py").write_text(f"import os\nif os.environ.get('RANK') == '0':\n{body}",
                                             encoding="utf-8")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in generate()["train"][:32]),
                                          encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(inject), *sys.path])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "fdpo.train", "--data", str(tmp_path / "train.jsonl"),
               "--max-steps", "2", "--batch-size", "8", "--save-every", "1", "--eval-every", "0", "--backend", "torch",
               "--no-progress", "--output-dir", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    errors = [line for line in done.stderr.splitlines() if line.startswith("fdpo.train: error: cannot write")]
    assert done.returncode != 0
    assert len(errors) == 2, done.stderr[-3000:]
    assert all(line.endswith("final: OSError: [Errno 28] No space left on device") for line in errors) \
        == (kind == "final"), errors
    assert "Connection closed by peer" not in done.stderr
    assert not (tmp_path / "run" / "final").exists()
    if kind == "checkpoint":
        assert not list((tmp_path / "run" / "checkpoints").glob("*"))


def dropout_model(path: Path) -> Path:
    """A tiny GPT-2 with dropout (its random numbers differ between processes: their batches have other
    padded shapes) and the built-in byte tokenizer, saved to `path`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fdpo.train.models import builtin_tokenizer

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=259, n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.1,
                        embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=257, eos_token_id=258, pad_token_id=256)
    GPT2LMHeadModel(config).save_pretrained(path)
    builtin_tokenizer().save_pretrained(path)
    return path


@pytest.mark.slow
def test_a_two_process_run_with_dropout_resumes_exactly_and_a_changed_process_count_is_reported(tmp_path):
    """Each process's random state is checkpointed and restored to it: a 2-process run with dropout stopped
    at step 2 and resumed gives the uninterrupted run's weights and records bit for bit. Resumed on one
    process, the run says the process count changed and records it in run.json."""
    model = dropout_model(tmp_path / "model")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in generate()["train"][:32]),
                                          encoding="utf-8")
    common = ["-m", "fdpo.train", "--model", str(model), "--data", str(tmp_path / "train.jsonl"), "--batch-size", "8",
              "--max-length", "64", "--schedule", "constant", "--warmup-steps", "0", "--log-every", "1",
              "--save-every", "2", "--eval-every", "0", "--backend", "torch", "--no-progress"]

    def train(out: str, steps: int, processes: int = 2, *extra: str) -> subprocess.CompletedProcess:
        launch = [sys.executable]
        if processes > 1:
            launch += ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
                       "127.0.0.1", "--master-port", str(free_port())]
        done = subprocess.run([*launch, *common, "--max-steps", str(steps), "--output-dir", str(tmp_path / out),
                               *extra], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{out} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    train("straight", 4)
    train("stopped", 2)
    train("stopped", 4, 2, "--resume", "latest")
    want = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    got = load_file(tmp_path / "stopped" / "final" / "model.safetensors")
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    train_records = [[r for r in metrics(tmp_path / out) if r["split"] == "train"] for out in ("straight", "stopped")]
    assert [{k: v for k, v in r.items() if k != "time"} for r in train_records[1]] \
        == [{k: v for k, v in r.items() if k != "time"} for r in train_records[0]]

    done = train("stopped", 5, 1, "--resume", "latest")
    assert "with changed settings: max_steps 4 -> 5; world_size 2 -> 1" in done.stderr
    run = json.loads((tmp_path / "stopped" / "run.json").read_text(encoding="utf-8"))
    assert run["resumes"][-1]["changed"] == {"max_steps": [4, 5], "world_size": [2, 1]}

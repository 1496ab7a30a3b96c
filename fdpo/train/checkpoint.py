"""Checkpoints on disk: written atomically, verified by checksums, loaded without running code.

A checkpoint is a directory `checkpoints/step-NNNNNNN` holding
    state.pt       the trainer's state: tensors and plain containers only (no pickled objects), so
                   it loads with `torch.load(..., weights_only=True)` and a crafted file cannot run code;
    config.json    the settings of the run, for people;
    manifest.json  written last: the SHA-256 and size of every other file.
It is assembled under a temporary name (`.tmp-...`) and renamed, so a crash while writing (a kill,
a full disk) never leaves a partial checkpoint under a final name; the next start removes the
temporary directories such a crash leaves behind. On load, every file is checked against the
manifest: a flipped byte, a truncated or an empty file makes the checkpoint fail verification, and
`latest_intact` falls back to the newest checkpoint that passes, saying which ones it skipped.
"""

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

STATE = "state.pt"
MANIFEST = "manifest.json"
TEMPORARY_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that fails verification, cannot be loaded, or cannot be written (nor another file of the
    run: metrics, run record, final model); the message names its path and why."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def remove(path: Path) -> None:
    """Delete a file or directory tree if it exists, ignoring errors (a cleanup after a failed write)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


# What torch's serialization writer says when it cannot write a file (a full disk, a directory removed
# meanwhile): it raises these as RuntimeError, not OSError.
WRITE_FAILURES = ("PytorchStreamWriter", "inline_container", "file write failed", "unexpected pos",
                  "Parent directory")


def failed_write(error: BaseException, errors: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether `error` says that a write failed: an OSError, one of `errors`, or a RuntimeError of torch's
    serialization writer (WRITE_FAILURES). Other RuntimeErrors (NotImplementedError, RecursionError, a
    CUDA error) are faults of their own, not of the disk."""
    if isinstance(error, (OSError, *errors)):
        return True
    return type(error) is RuntimeError and any(marker in str(error) for marker in WRITE_FAILURES)


@contextlib.contextmanager
def writing(path: Path, *, temporary: Path | None = None, errors: tuple[type[BaseException], ...] = ()):
    """A block that writes `path`. An exception in it removes `temporary` (its half-written copy); a failed
    write (`failed_write`: an OSError, torch.save's RuntimeError for a full disk, one of `errors`) becomes
    a one-line CheckpointError naming `path`, chained to it; any other exception propagates unchanged."""
    try:
        yield
    except Exception as error:
        if temporary is not None:
            remove(temporary)
        if isinstance(error, CheckpointError) or not failed_write(error, errors):
            raise
        raise CheckpointError(f"cannot write {path}: {type(error).__name__}: {first_line(error)}") from error


def rng_state(device: torch.device | None = None) -> dict:
    """The random states of Python, numpy's global generator, torch and, for a CUDA `device`, that GPU's
    generator, as tensors and plain values (one process's: its own GPU's alone, so that a resume that
    sees fewer GPUs can restore it).

    numpy's legacy global generator is what user code seeds with `np.random.seed`: it is kept too,
    its key array stored as a tensor so that the state loads with `weights_only=True`.
    """
    kind, keys, position, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    version, python_state, python_gauss = random.getstate()
    state = {"python": {"version": version, "state": list(python_state), "gauss": python_gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore the random states saved by `rng_state`, the GPU's to the CUDA `device`. A checkpoint
    written before one GPU's state was kept holds every visible GPU's: `device`'s is taken from it."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],  # noqa: NPY002
                         numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        cuda = state["cuda"]
        if isinstance(cuda, list | tuple):
            cuda = cuda[device.index] if device.index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def non_finite_tensors(state, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in a nested dict/list state that hold a NaN or an inf."""
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return [prefix] if local.is_floating_point() and not bool(torch.isfinite(local).all()) else []
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [name for key, value in items
            for name in non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))]


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def write_checkpoint(root: Path, name: str, state: dict, config: dict) -> Path:
    """Write `root/name` (state.pt, config.json, manifest.json last) atomically; returns its path.

    An existing checkpoint of the same name is replaced only once the new one is complete. A write
    that fails (a full disk) removes its temporary directory and raises CheckpointError naming the path.
    """
    final = root / name
    temporary = root / f"{TEMPORARY_PREFIX}{name}-{os.getpid()}"
    with writing(final, temporary=temporary):
        root.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir()
        torch.save(state, temporary / STATE)
        (temporary / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        files = {}
        for path in sorted(temporary.iterdir()):
            _fsync(path)
            files[path.name] = {"sha256": file_digest(path), "bytes": path.stat().st_size}
        manifest = temporary / MANIFEST
        manifest.write_text(json.dumps({"files": files}, indent=2) + "\n", encoding="utf-8")
        _fsync(manifest)
        install(temporary, final)
    return final


def install(temporary: Path, final: Path) -> None:
    """Rename the complete directory `temporary` to `final`, replacing an existing `final` only then.

    An existing `final` is first renamed to `.tmp-old-<name>-<pid>` beside it and deleted once the
    new one is in place: a kill between the two renames leaves both complete copies under their
    temporary names, which the next start puts back (fdpo.train.rundir.prepare_output_dir).
    """
    if final.exists():
        old = final.with_name(f"{TEMPORARY_PREFIX}old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(temporary, final)
        shutil.rmtree(old)
    else:
        os.replace(temporary, final)


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError (naming `path` and the reason) unless every file matches the manifest."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST} (not a checkpoint, or written by an "
                              "interrupted or older run)")
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        entries = [(name, int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({error})") from None
    if STATE not in files:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} lists no {STATE}")
    for name, size, sha256 in entries:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path}: {name} has {file.stat().st_size} bytes, the manifest says "
                                  f"{size} (truncated or overwritten)")
        if file_digest(file) != sha256:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its SHA-256 in the manifest (corrupted)")


def load_checkpoint_state(path: str | Path) -> dict:
    """The verified state of the checkpoint directory `path`, loaded with weights_only=True (no code runs)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    verify_checkpoint(path)
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means the file cannot be trusted
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path}: {STATE} cannot be loaded safely ({first_line})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "run"} <= set(state):
        raise CheckpointError(f"checkpoint {path}: {STATE} is not a trainer state")
    return state


def checkpoint_step(path: Path) -> int | None:
    """The step number of a checkpoint directory's name `step-N`, or None for another name."""
    match = re.fullmatch(r"step-(\d+)", path.name)
    return int(match.group(1)) if match else None


def checkpoint_dirs(root: Path) -> list[Path]:
    """The checkpoint directories `step-N` under root (a run's `checkpoints/`), oldest step first.

    Ordered by the number N, not the name: step-10000000 (past the zero padding) is newer than step-9999999.
    """
    found = [(checkpoint_step(p), p.name, p) for p in root.glob("step-*") if p.is_dir()]
    return [path for step, _, path in sorted(entry for entry in found if entry[0] is not None)]


def latest_intact(root: Path, say: Callable[[str], None] = print) -> tuple[Path, dict] | None:
    """(path, state) of the newest checkpoint under root that verifies and loads, or None.

    Every newer checkpoint that fails is reported through `say`, with its path and the reason.
    """
    for path in reversed(checkpoint_dirs(root)):
        try:
            return path, load_checkpoint_state(path)
        except CheckpointError as error:
            say(f"skipping {error}")
    return None


def prune(root: Path, keep: int, *, written: Path) -> None:
    """Delete all but `keep` checkpoints under root: `written` (the one just written) and the keep - 1 newest others.

    A checkpoint newer than `written` (left by another history) never pushes `written` out.
    """
    others = [path for path in checkpoint_dirs(root) if path.name != written.name]
    for old in others[:max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint under output_dir/checkpoints whose files match their manifest, or None."""
    for path in reversed(checkpoint_dirs(Path(output_dir) / "checkpoints")):
        try:
            verify_checkpoint(path)
        except CheckpointError:
            continue
        return path
    return None

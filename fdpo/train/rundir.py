"""A run's output directory: which run owns it, what it has logged, and what a resume may change.

A run records its identity in `<output-dir>/run.json` (a random run id, its start time, and the
hash of the settings that give the training state its meaning) and in every checkpoint. A new run
refuses a directory that already holds another run's checkpoints, metrics or final model, unless
it resumes that run or is told to overwrite it; a resume refuses a checkpoint whose meaningful
settings differ from its own, naming the fields, and logs the harmless ones that changed.
`metrics.jsonl` is cut back on resume to the records written before the checkpoint, so records of
steps that are run again are not repeated. A run holds an exclusive lock on `<output-dir>/.lock`
from before it looks at the directory until it ends, so two processes never share a directory (on a
file system without flock it runs without the lock, and says so).
"""

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from .checkpoint import TEMPORARY_PREFIX, CheckpointError, checkpoint_dirs, verify_checkpoint, writing

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
# Locked (flock) by the run that uses the directory, and names it (pid, host, since when). Never
# deleted: removing a file another process holds locked would let a third one lock a new file.
LOCK_FILE = ".lock"
# What flock fails with on a file system that does not support it (Lustre mounted without -o flock:
# ENOSYS; NFSv3 without lockd: ENOLCK; others: EOPNOTSUPP): a run there goes on without the lock.
NO_FLOCK = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})
# What a run writes at the top of its output directory; --overwrite removes exactly these (the
# reference cache is keyed by its content and stays valid, so it is kept).
RUN_ENTRIES = ("checkpoints", METRICS_FILE, "final", RUN_FILE, "config.json")

# Settings that give a checkpoint's state its meaning: a resume must use the same values. The
# model's configuration enters as its entries (`models.model_config`, compared entry by entry); its
# parameter layout and initial weights and the training data's tokens are compared through digests
# (see `Trainer.identity`). Every other setting (cadences, max_steps, learning rate, weight decay and
# schedule, backend, device, ...) may change on resume; it is applied and logged when it does.
IDENTITY_FIELDS = ("model", "model_config", "model_layout", "model_weights", "tokenizer", "data", "max_length",
                   "max_prompt_length", "packed", "batch_size", "grad_accum", "seed", "method", "divergence", "alpha",
                   "beta", "loss", "label_smoothing", "nll_weight", "epsilon", "tdpo_variant", "token_divergence",
                   "token_alpha", "token_beta", "reference")
# Identity fields added after runs were first recorded, with the value every run recorded without
# them had (TDPO's per-token divergence was KL(ref || policy) before it could be chosen).
ADDED_FIELDS = {"token_divergence": "forward_kl", "token_alpha": 0.5, "token_beta": 0.5}
# Identity fields added later whose value a run recorded without them cannot tell: compared only
# when the checkpoint's run recorded them. A model_config recorded as a digest string (before it held
# the entries themselves) tells no entry either, and counts as not recorded.
UNRECORDED_FIELDS = ("model_weights", "model_config")
# Settings that never describe the run itself.
NOT_COMPARED = ("resume", "overwrite", "output_dir", "progress")


class RunDirectoryError(ValueError):
    """An output directory or resume request that would mix, overwrite or misread runs (one line)."""


def config_hash(fields: dict) -> str:
    """sha256 (hex) of the identity fields, as canonical JSON."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def new_run(fields: dict) -> dict:
    """A fresh run identity: random id, UTC start time, the identity fields and their hash."""
    return {"run_id": uuid.uuid4().hex, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config_hash": config_hash(fields), "fields": fields}


class Absent:
    """The value of an entry one side of a compared dict field lacks (an entry equal to its class's default)."""

    def __repr__(self) -> str:
        return "the class default"


ABSENT = Absent()


def mismatched_fields(stored: dict, current: dict) -> dict[str, tuple]:
    """{field: (stored, current)} of the identity fields that differ; a field of ADDED_FIELDS that a run
    recorded before it existed lacks counts as its value then, so such runs still resume, and a field
    of UNRECORDED_FIELDS that it lacks (or holds as model_config's former digest string) is not compared.

    A field that is a dict on both sides (model_config) is compared entry by entry: each entry that
    differs, or that one side lacks (ABSENT), is named '<field>.<entry>'.
    """
    stored = {**ADDED_FIELDS, **stored}
    if isinstance(stored.get("model_config"), str):
        del stored["model_config"]
    names = sorted((set(stored) | set(current)) - (set(UNRECORDED_FIELDS) - set(stored)))
    differ = {}
    for name in names:
        old, new = stored.get(name), current.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            pairs = {entry: (old.get(entry, ABSENT), new.get(entry, ABSENT)) for entry in sorted(set(old) | set(new))}
            differ.update({f"{name}.{entry}": pair for entry, pair in pairs.items() if pair[0] != pair[1]})
        elif old != new:
            differ[name] = (old, new)
    return differ


def read_run(output_dir: Path) -> dict | None:
    """The run.json of output_dir, or None when there is none (an unreadable one is a RunDirectoryError
    naming it; the checkpoints, which hold the run's record too, are another matter: see `Trainer.resume`)."""
    path = output_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(run, dict) or not isinstance(run.get("run_id"), str):
            raise ValueError("no run_id")
    except ValueError as error:
        raise RunDirectoryError(f"{path} is unreadable ({error})") from None
    return run


def not_writable(output_dir: Path, error: OSError) -> RunDirectoryError:
    """The one-line error for an output directory that cannot be created or written."""
    return RunDirectoryError(f"output directory {output_dir} is not writable ({error.strerror or error}): "
                             "choose another --output-dir")


class RunLock:
    """An exclusive `fcntl.flock` on `<output-dir>/.lock`, held until `release` (or until the process ends).

    Take it with `lock_output_dir`. The lock belongs to the open file: closing it, explicitly or
    when the process exits or is killed, releases it, so a dead run never keeps its directory locked.
    """

    def __init__(self, file, path: Path) -> None:
        self.file, self.path = file, path

    def release(self) -> None:
        """Release the lock (idempotent); the file stays."""
        if not self.file.closed:
            self.file.close()


def lock_output_dir(output_dir: Path, say: Callable[[str], None]) -> RunLock | None:
    """Create output_dir if needed and lock it for this process; returns the held lock.

    On a file system without flock (NO_FLOCK) the run goes on without a lock: `say` tells the user
    so in one line, and None is returned. Raises RunDirectoryError, naming the holder (pid, host and
    start time it recorded in the lock file), when another process holds the directory; or when it
    cannot be created or written, or flock fails otherwise.
    """
    path = output_dir / LOCK_FILE
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        file = path.open("a+", encoding="utf-8")
    except OSError as error:
        raise not_writable(output_dir, error) from None
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read(1000).strip()
        file.close()
        try:
            record = json.loads(holder)
            who = f"pid {record['pid']} on host {record['host']}, since {record['since']}"
        except (ValueError, TypeError, KeyError):
            who = "a process that has not recorded itself yet"
        raise RunDirectoryError(f"output directory {output_dir} is in use by another run ({who}; lock file "
                                f"{path}): wait until it ends, or choose another --output-dir") from None
    except OSError as error:
        file.close()
        if error.errno in NO_FLOCK:
            say(f"output directory {output_dir} is on a file system without flock ({error.strerror or error}): "
                "running without its lock, so nothing stops another process from using it at the same time")
            return None
        raise RunDirectoryError(f"cannot lock output directory {output_dir} ({error.strerror or error}): choose "
                                "another --output-dir") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    file.truncate(0)
    file.write(json.dumps(holder) + "\n")
    file.flush()
    return RunLock(file, path)


def write_run(output_dir: Path, run: dict) -> None:
    """Write run.json atomically (CheckpointError naming it when it cannot be written)."""
    path = output_dir / RUN_FILE
    temporary = path.with_name(f".{RUN_FILE}.{os.getpid()}.tmp")
    with writing(path, temporary=temporary):
        temporary.write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)


def previous_run_files(output_dir: Path) -> list[str]:
    """What another run left in output_dir: checkpoints, metrics, final model, run file (names)."""
    found = []
    if checkpoint_dirs(output_dir / "checkpoints"):
        found.append("checkpoints")
    for name in (METRICS_FILE, "final", RUN_FILE):
        if (output_dir / name).exists():
            found.append(name)
    return found


def prepare_output_dir(output_dir: Path, *, resume: bool, overwrite: bool) -> list[str]:
    """Check that output_dir can hold this run and tidy what an interrupted write left; returns notes for the user.

    Raises RunDirectoryError when the directory cannot be written, or when a new run (neither
    resuming nor overwriting) would start in a directory holding another run's files. Nothing of
    a run is deleted here: `clear_run` does that for overwrite, once the run is known to start.
    A checkpoint that a killed replacement left only under its temporary names is restored (see
    `restore_replaced_checkpoints`), and so is the final model (`restore_replaced_final`); every
    other temporary checkpoint or final-model directory and run / metrics file left by an
    interrupted write is removed. The caller holds the directory's lock (`lock_output_dir`), so
    these leftovers are a dead run's, never the files of a run still writing them (on a file system
    without flock, where there is no lock, the user was told that nothing guards the directory).
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise not_writable(output_dir, error) from None
    found = previous_run_files(output_dir)
    if found and not resume and not overwrite:
        raise RunDirectoryError(f"output directory {output_dir} already holds a run ({', '.join(found)}): pass "
                                "--resume latest to continue it, a new --output-dir, or --overwrite to clear it")
    root = output_dir / "checkpoints"
    notes = restore_replaced_checkpoints(root) if root.is_dir() else []
    notes += restore_replaced_final(output_dir)
    removed = sorted(root.glob(f"{TEMPORARY_PREFIX}*")) if root.is_dir() else []
    removed += sorted(output_dir.glob(f"{TEMPORARY_PREFIX}*final-*"))
    removed += sorted(p for name in (RUN_FILE, METRICS_FILE) for p in output_dir.glob(f".{name}.*.tmp"))
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return notes + [f"removed {path}, left by an interrupted write" for path in removed]


def restore_replaced_checkpoints(root: Path) -> list[str]:
    """Put back under `step-N` a checkpoint that a kill left only under its temporary names; returns notes.

    Replacing `step-N` renames it to `.tmp-old-step-N-<pid>`, then the complete new copy
    `.tmp-step-N-<pid>` to `step-N`: a kill between the two renames leaves no `step-N`. The new
    copy is restored when it passes verification, else the old one; a copy that fails stays
    temporary (and is removed with the other leftovers).
    """
    notes = []
    for name in sorted({p.name.rsplit("-", 1)[0] for p in root.glob(f"{TEMPORARY_PREFIX}old-step-*")}):
        step = name[len(f"{TEMPORARY_PREFIX}old-"):]
        final = root / step
        if final.exists():
            continue
        candidates = [*sorted(root.glob(f"{TEMPORARY_PREFIX}{step}-*")), *sorted(root.glob(f"{name}-*"))]
        for candidate in candidates:
            try:
                verify_checkpoint(candidate)
            except CheckpointError:
                continue
            os.replace(candidate, final)
            notes.append(f"restored {final} from {candidate}, left by an interrupted replacement of that checkpoint")
            break
    return notes


def restore_replaced_final(output_dir: Path) -> list[str]:
    """Put back `final` when a kill left it only under its temporary names (see `install`); returns notes.

    `.tmp-old-final-<pid>` exists only once `.tmp-final-<pid>` was completely written, so that new
    copy is restored when it is there, else the old one.
    """
    final = output_dir / "final"
    aside = sorted(output_dir.glob(f"{TEMPORARY_PREFIX}old-final-*"))
    if final.exists() or not aside:
        return []
    new = output_dir / f"{TEMPORARY_PREFIX}final-{aside[-1].name.rsplit('-', 1)[1]}"
    source = new if new.is_dir() else aside[-1]
    os.replace(source, final)
    return [f"restored {final} from {source}, left by an interrupted replacement of the final model"]


def clear_run(output_dir: Path) -> None:
    """Delete the run in output_dir (--overwrite): its checkpoints, metrics, final model, run and config files."""
    for name in RUN_ENTRIES:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended as the run goes (by the process that writes)."""

    def __init__(self, path: Path, *, write: bool = True) -> None:
        self.path, self.write = path, write
        self.lines = 0

    def append(self, record: dict) -> None:
        """Append one record (CheckpointError naming the file when it cannot be written)."""
        if self.write:
            with writing(self.path), self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        self.lines += 1

    def restore(self, lines: int) -> list[dict]:
        """Keep the first `lines` records (those written before a checkpoint), drop the rest; return the kept.

        The file is rewritten atomically. Records it lacks (a metrics file deleted by hand) are not
        invented: what is there is kept.
        """
        kept: list[str] = []
        if self.path.is_file():
            with self.path.open(encoding="utf-8", errors="replace") as f:
                for line in f:
                    if len(kept) == lines:
                        break
                    if line.strip():
                        kept.append(line if line.endswith("\n") else line + "\n")
        if self.write:
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with writing(self.path, temporary=temporary):
                temporary.write_text("".join(kept), encoding="utf-8")
                os.replace(temporary, self.path)
        self.lines = len(kept)
        records = []
        for line in kept:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

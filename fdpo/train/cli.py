"""Command line of the trainer: parse the settings, train, print the final summary."""

import os
import sys
import traceback
from typing import NoReturn

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError
from .config import BUILTIN_MODEL, parse_args
from .loop import Trainer, TrainingError, torchrun_worker


def change(first: dict | None, last: dict, key: str, digits: int) -> str:
    """'first -> last' of a metric, or the last value alone without a first record."""
    value = f"{last[key]:.{digits}f}"
    return f"{first[key]:.{digits}f} -> {value}" if first else value


def format_summary(summary: dict, config) -> str:
    """The final summary as a few lines of text.

    After a resume into another output directory, the records before the checkpoint are not there:
    the train line says from which step it counts, and the held-out line gives the last evaluation alone.
    """
    steps = f"{summary['steps']} steps"
    if summary["resumed_from"]:
        steps += f" ({summary['steps_this_call']} in this call, resumed from {summary['resumed_from']})"
    lines = [f"fdpo.train: {steps} in {summary['seconds']:.1f} s — model {config.model}, "
             f"method {config.method}, divergence {config.divergence}, loss {config.loss}, beta {config.beta}, "
             f"nll weight {config.resolved_nll_weight()}"]
    if "beta" in (summary["last_train"] or {}):
        # a record written before next_beta was logged carries the updated beta as its beta
        final_beta = summary["last_train"].get("next_beta", summary["last_train"]["beta"])
        lines.append(f"  epsilon-DPO beta {config.beta} -> {final_beta:.5f}")
    first, last = summary["first_train"], summary["last_train"]
    if first and last:
        since = f" (from step {first['step']})" if first["step"] > 1 else ""
        lines.append(f"  train     loss {first['loss']:.4f} -> {last['loss']:.4f}   reward accuracy "
                     f"{first['accuracy']:.3f} -> {last['accuracy']:.3f}{since}")
    first, last = summary["first_eval"], summary["last_eval"]
    if last:
        lines.append(f"  held-out  loss {change(first, last, 'loss', 4)}   reward accuracy "
                     f"{change(first, last, 'accuracy', 3)}   margin {change(first, last, 'margin', 3)}"
                     + ("" if first else f"   (step {last['step']}; earlier evaluations are not in this output "
                                         "directory)"))
        if "kl" in last:
            kl = f"KL to the reference {last['kl']:.4f}"
        else:  # with cached reference sums; records written before the rename call it kl_estimate
            kl = f"chosen log-ratio to the reference {last.get('chosen_logratio', last.get('kl_estimate')):.4f}"
        lines.append(f"            {kl}   entropy {change(first, last, 'entropy', 3)}   ECE {last['ece']:.3f}")
    if "task_reward" in summary:
        before, after = summary["task_reward"]
        reward = f"{after:.3f}" if before is None else f"{before:.3f} -> {after:.3f}"
        lines.append(f"  greedy answers to held-out prompts: mean task reward {reward} (1 = sorted)")
    lines.append(f"  metrics {summary['output_dir']}/metrics.jsonl   checkpoint {summary['checkpoint']}   "
                 f"model {summary['model']}")
    return "\n".join(lines)


def exit_without_finalization(status: int) -> NoReturn:
    """Flush stdout and stderr and end the process with `status` now, without the interpreter's finalization.

    For torchrun workers whose work is done: every file is written and closed by then, and a worker's
    finalization sometimes aborted (SIGABRT, "terminate called without an active exception": a native
    thread still joinable in a static destructor, seen with gloo on a loaded CPU machine), which made
    torchrun report a complete run as failed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m fdpo.train`; returns the exit status.

    A torchrun worker (WORLD_SIZE > 1) ends its process here (`exit_without_finalization`) while the
    trainer is still referenced: releasing it after the process group is destroyed ran the DDP / FSDP
    wrappers' native destructors, which sometimes blocked for good after the summary was printed (4 of
    10 two-process runs of a small GPT-2 on CPU; torchrun then waited for the worker forever). An
    exception other than the one-line errors ends a worker there too, after its traceback.
    """
    status, trainer = 1, None
    try:
        config = parse_args(argv)
        threads = config.threads or (1 if config.model == BUILTIN_MODEL else None)
        if threads:
            torch.set_num_threads(threads)
        trainer = Trainer(config)
        summary = trainer.train()
        status = 0
    except (TrainingError, CheckpointError, ValueError, FileNotFoundError) as error:
        # one write per line: every process of a distributed run reports its error on the same stderr, and
        # print's two writes (the text, then the newline) let one process's line run into another's
        sys.stderr.write(f"fdpo.train: error: {error}\n")
        sys.stderr.flush()
    except Exception:
        if not torchrun_worker():
            raise
        # a worker ends below like any other: its traceback, in one write, and status 1
        sys.stderr.write(traceback.format_exc())
        sys.stderr.flush()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if status == 0 and trainer.rank == 0:
        print(format_summary(summary, config))
    if torchrun_worker():
        exit_without_finalization(status)
    return status


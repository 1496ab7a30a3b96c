"""What the trainer reports: the calibration of the implicit classifier, and progress on stderr."""

import contextlib
import sys
import time

import torch
from tqdm import tqdm


def expected_calibration_error(margins: torch.Tensor, bins: int = 10) -> float:
    """ECE of the implicit preference classifier P(chosen wins) = sigmoid(margin), margins float [P].

    The classifier predicts the side it gives more than 1/2; its confidence max(p, 1 - p) falls in
    one of `bins` equal-width bins over [1/2, 1]; ECE = sum over bins of (pairs in bin / P) *
    |accuracy in bin - mean confidence in bin|, where a pair is right when the chosen side is
    predicted (a tie, margin 0, counts as half right).
    """
    p = torch.sigmoid(margins.double())
    confidence = torch.maximum(p, 1 - p)
    correct = (margins > 0).double() + 0.5 * (margins == 0).double()
    index = ((confidence - 0.5) * 2 * bins).long().clamp(0, bins - 1)
    error = 0.0
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            gap = correct[chosen].mean().item() - confidence[chosen].mean().item()
            error += chosen.double().mean().item() * abs(gap)
    return error


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """transformers' own progress bars on (a terminal) or off (a log) for the duration of the block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


class Progress:
    """Training progress on stderr: a tqdm bar on a terminal; otherwise one line every `every` steps.

    Without a terminal (a log file, CI, a job scheduler) a redrawn bar would fill the log with
    carriage-return frames, so plain lines are written instead.
    """

    def __init__(self, total: int, initial: int, *, every: int, enabled: bool) -> None:
        self.total, self.every, self.enabled = total, every, enabled
        self.start = time.perf_counter()
        terminal = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True) if terminal else None

    def update(self, step: int, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}")
        elif self.enabled and (step % self.every == 0 or step == self.total):
            print(f"train step {step}/{self.total}  loss {metrics['loss']:.4f}  accuracy {metrics['accuracy']:.3f}  "
                  f"{time.perf_counter() - self.start:.1f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""The reference model of the preference losses: a frozen copy of the policy, or a disk cache.

`FrozenReference` keeps a frozen copy next to the policy and gives the losses its hidden states
and head (every method, including the token-level ones, can use it). `CachedReference` runs the
reference once over the data, stores the per-sequence log-prob sums on disk under a key made
from the tokenized data and every byte of the reference's weights, and from then on only looks
them up: the reference need not be in memory while training (sequence-level losses only).
"""

import copy
import hashlib
import os
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .adapter import CausalLM, unwrap
from .data import PreferenceBatch, PreferenceExample, eval_batches, examples_digest


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in eval mode with every parameter frozen."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


class FrozenReference:
    """A frozen reference model: hidden states and head for the losses, or log-prob sums."""

    def __init__(self, lm: CausalLM) -> None:
        self.lm = lm

    @torch.no_grad()
    def loss_inputs(self, batch: PreferenceBatch) -> dict:
        """Keyword arguments of the losses: ref_hidden (same layout as the policy's) and ref_head."""
        hidden, head = self.lm.head_inputs(batch.input_ids, attention_mask=batch.attention_mask,
                                           position_ids=batch.position_ids, packed=batch.cu_seqlens is not None)
        return {"ref_hidden": hidden, "ref_head": head}

    @torch.no_grad()
    def sums(self, batch: PreferenceBatch) -> torch.Tensor:
        """float32 [2P] log-prob sums of the batch's sequences (chosen first)."""
        return self.lm(batch.input_ids, batch.labels, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens, per_sequence=True)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 (hex) of an unsharded model's state: every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        # The array itself (a buffer), not .tobytes(): no second copy of every tensor's bytes.
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def fingerprint(examples: Sequence[PreferenceExample], weights: str, extra: str = "") -> str:
    """sha256 of the tokenized pairs, `extra`, and the model's `weights_digest` `weights`."""
    digest = examples_digest(examples)
    digest.update(extra.encode())
    digest.update(weights.encode())
    return digest.hexdigest()


def cache_settings(lm: CausalLM, packed: bool) -> str:
    """Everything besides the data and the weights that the cached sums depend on: the head's options
    and ignore_index, the layout, the dtype the reference computes in (autocast's, where the cache is
    built under it, else the weights'), the device type, and the model's class and configuration (rope,
    norm epsilon, heads and the rest, which no weight records), with the PEFT adapters' settings."""
    parameter = next(lm.parameters())
    device = parameter.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else parameter.dtype
    model = unwrap(lm.model)
    peft = getattr(lm.model, "peft_config", None)
    peft_settings = "" if peft is None else repr(sorted((name, repr(c)) for name, c in peft.items()))
    return "|".join((str(lm.options), str(lm.ignore_index), str(packed), str(dtype), device,
                     type(model).__name__, model.config.to_json_string(use_diff=False), peft_settings))


def read_cache(path: Path, key: str, num_pairs: int) -> torch.Tensor | None:
    """The float32 [num_pairs, 2] sums stored at `path` under `key`, or None (with a warning) if unusable.

    A cache that cannot be read (truncated, corrupted: every member's CRC is checked, not a tensor
    file) or holds something else than these pairs' finite sums is reported and recomputed, never
    trusted.
    """
    try:
        with zipfile.ZipFile(path) as archive:  # torch.load does not check the archive's CRCs
            damaged = archive.testzip()
        if damaged is not None:
            raise ValueError(f"its member {damaged} fails its checksum")
        stored = torch.load(path, map_location="cpu", weights_only=True)
        sums = stored["sums"]
        usable = (stored["key"] == key and isinstance(sums, torch.Tensor) and sums.dtype == torch.float32
                  and tuple(sums.shape) == (num_pairs, 2) and bool(torch.isfinite(sums).all()))
    except Exception as error:  # whatever the damage, the file is recomputed
        warnings.warn(f"reference cache {path} is unreadable ({type(error).__name__}: {error}); recomputing it",
                      stacklevel=3)
        return None
    if not usable:
        warnings.warn(f"reference cache {path} does not hold these pairs' sums; recomputing it", stacklevel=3)
        return None
    return sums


class CachedReference:
    """Reference log-prob sums of every pair of a dataset, looked up by the pairs' indices.

    sums: float32 [E, 2], the (chosen, rejected) sums of each of the E pairs.
    """

    def __init__(self, sums: torch.Tensor) -> None:
        self.table = sums

    @classmethod
    def build(cls, reference: FrozenReference, examples: Sequence[PreferenceExample], cache_dir: str | Path, *,
              batch_size: int, pad_token_id: int, packed: bool = False, write: bool = True,
              weights: str | None = None) -> "CachedReference":
        """Load the sums for (examples, reference weights) from `cache_dir`, or compute and store them.

        The file is `cache_dir/reference-<key>.pt`, written to a temporary name and renamed, so a
        crash never leaves a partial file under the final name. `write=False` computes without
        storing (the other ranks of a distributed run). weights: the reference model's
        `weights_digest` when the caller has it (hashing a large model's weights takes a while),
        else computed here.
        """
        lm = reference.lm
        key = fingerprint(examples, weights or weights_digest(lm.model), cache_settings(lm, packed))
        path = Path(cache_dir) / f"reference-{key[:32]}.pt"
        stored = read_cache(path, key, len(examples)) if path.is_file() else None
        if stored is not None:
            return cls(stored)
        device = next(lm.parameters()).device
        sums = []
        for batch in eval_batches(examples, batch_size, pad_token_id=pad_token_id, packed=packed,
                                  ignore_index=lm.ignore_index):
            both = reference.sums(batch.to(device)).float().cpu()
            sums.append(torch.stack(both.chunk(2), dim=1))
        table = torch.cat(sums)
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            # A unique temporary name (not the process id alone: processes of other hosts sharing the
            # directory can have the same one), renamed into place once written.
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(handle)
            torch.save({"key": key, "sums": table}, temporary)
            os.replace(temporary, path)
        return cls(table)

    def loss_inputs(self, batch: PreferenceBatch) -> dict:
        """Keyword arguments of the losses: ref_logprobs = (chosen [P], rejected [P])."""
        rows = self.table[batch.indices.cpu()].to(batch.labels.device)
        return {"ref_logprobs": (rows[:, 0], rows[:, 1])}

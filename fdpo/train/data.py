"""Preference data: records of prompt / chosen / rejected, tokenized into padded or packed batches.

A record holds `prompt`, `chosen` and `rejected`, each a plain string or a list of chat messages
({"role", "content"}) rendered with the tokenizer's chat template (the prompt with the generation
prompt appended, each response as the continuation of the rendered conversation: a response's
messages start with the assistant's, the conversation before it is the prompt's).

Tokenization follows TRL's DPOTrainer: each response is tokenized with its prompt, and the response is
the tokens after those the tokenized prompt and both tokenized conversations share (a SentencePiece
tokenizer then marks no word start on a response's first word, as the model reads it after the
prompt). Where a token merges across the boundary (a prompt ending in "Answer:" and a response "
Paris" can tokenize as "Answer", ":", " Paris" or fuse the colon into a longer token) the prompt
stops before that token and the merged token is the response's first, scored with its prompt
characters, as in TRL. The prompt starts with the bos token where the tokenizer adds one (`adds_bos`:
Llama's, Mistral's, Gemma's, the built-in model's; not GPT-2's, GPT-NeoX's or Qwen's), once, also
where a chat template writes it itself; a message prompt on such a tokenizer whose template writes
none gets it too (TRL's chat path adds none there). A response given as a string ends with the eos
token unless its last token already is eos; a response given as messages ends as the chat template
ends the assistant's turn (ChatML's "<|im_end|>\n"), with no eos added, as in TRL. Prompt tokens are
masked from the loss: labels are the next token, `ignore_index` wherever that token belongs to the
prompt (or is padding).

Batches put the P chosen sequences first and then the P rejected ones, the layout of
`fdpo.PreferenceLoss`:
    padded: input_ids / attention_mask / labels [2P, T];
    packed: input_ids / position_ids [1, N] and labels [N] with cu_seqlens [2P + 1]: the sequences
        back to back, position ids restarting at 0 for each and no attention mask. That keeps
        attention within each sequence only in models whose mask transformers builds from the
        position ids; `fdpo.train.CausalLM` refuses the others (OPT, BLOOM, MPT, Mamba, Jamba, LFM2,
        Falcon-H1) at the first packed call.
"""

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .checkpoint import first_line

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferenceExample:
    """One tokenized pair: prompt ids (bos included) and the two responses' ids (eos included)."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    # Whether (chosen, rejected) were cut to max_length; not part of the pair's identity.
    truncated: tuple[bool, bool] = field(default=(False, False), compare=False)


@dataclass
class PreferenceBatch:
    """P pairs in the loss layout (chosen rows first); see the module docstring.

    input_ids: int64 [2P, T] (padded) or [1, N] (packed); attention_mask: int64 [2P, T] or None;
    position_ids: int64 [1, N] (packed) or None; labels: int64 [2P, T] or [N]; cu_seqlens: int32
    [2P + 1] (packed) or None; indices: int64 [P], the pairs' positions in their dataset;
    ignore_index: the label of the tokens that are not scored.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    ignore_index: int = -100

    @property
    def num_pairs(self) -> int:
        return self.indices.numel()

    @property
    def num_tokens(self) -> int:
        """Scored (response) tokens in the batch: labels other than ignore_index."""
        return int((self.labels != self.ignore_index).sum())

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        """The same batch with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return PreferenceBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


# Two assistant messages of one differing character (Unicode private use): their renderings part
# exactly where the assistant's content begins.
CONTENT_MARKS = ("\ue000", "\ue001")


def _render(record: dict, tokenizer, where: str) -> tuple[str, str, str]:
    """The prompt text and the two response texts of a validated record.

    Message records are rendered with the chat template. The prompt is the longest common prefix of
    the prompt rendered with its generation prompt and of both rendered conversations, as TRL cuts it:
    templates such as DeepSeek-R1's open the assistant turn with more for generation ("<think>") than
    they render in a conversation, and that extra text is neither prompt nor response. It must hold
    the prompt's own messages as rendered alone; the responses are the rest of each conversation.
    """
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return prompt, record["chosen"], record["rejected"]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{where}: messages need a tokenizer with a chat template, and this one has none")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    names = ("chosen", "rejected")
    conversations = {}
    for name in names:
        response = record[name]
        if isinstance(response, list):
            if response[0]["role"] != "assistant":
                raise ValueError(f"{where}: field {name!r} must start with the assistant's message, got role "
                                 f"{response[0]['role']!r}: the conversation before the response belongs in "
                                 "'prompt' only")
            conversations[name] = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    cut = [prompt_text, *conversations.values()]
    if conversations:
        # The cut stops where the assistant's content starts (`CONTENT_MARKS`), even when both
        # responses begin with the generation prompt's tail ("<t..." after R1's "<think>").
        cut += [tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": mark}], tokenize=False)
                for mark in CONTENT_MARKS]
    start = os.path.commonprefix(cut)  # noqa: RUF071 (text, not paths)
    # The prompt's messages as rendered alone (up to where Phi-3's template closes them with eos
    # instead of opening the assistant's turn) must come first.
    opened = os.path.commonprefix([tokenizer.apply_chat_template(prompt, tokenize=False), prompt_text])  # noqa: RUF071
    if not start.startswith(opened):
        raise ValueError(f"{where}: the chat template does not render the conversation as the prompt followed by "
                         "the response")
    if start != prompt_text and len(conversations) < len(names):
        raise ValueError(f"{where}: one response is a string and the other messages, but this chat template "
                         "renders the assistant's turn otherwise than its generation prompt: give both as messages")
    responses = [conversations[n][len(start):] if n in conversations else record[n] for n in names]
    return start, responses[0], responses[1]


def _check_messages(value, where: str, name: str) -> None:
    if not value or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                            and isinstance(m.get("content"), str) for m in value):
        raise ValueError(f"{where}: field {name!r} must be a non-empty string or a non-empty list of "
                         "messages {'role': str, 'content': str}")


def validate_record(record, where: str) -> dict:
    """The record if it has the three fields as non-empty strings or message lists; else ValueError.

    `where` (e.g. "data.jsonl:12") starts every message.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object with fields {FIELDS}, got "
                         f"{type(record).__name__}")
    for name in FIELDS:
        if name not in record:
            raise ValueError(f"{where}: field {name!r} is missing (a record needs {FIELDS})")
        value = record[name]
        if isinstance(value, str):
            if not value.strip():
                raise ValueError(f"{where}: field {name!r} is empty")
        elif isinstance(value, list):
            _check_messages(value, where, name)
        else:
            raise ValueError(f"{where}: field {name!r} must be a string or a list of messages, got "
                             f"{type(value).__name__}")
    for name in ("chosen", "rejected"):
        if isinstance(record["prompt"], str) and isinstance(record[name], list):
            raise ValueError(f"{where}: field {name!r} is a message list but 'prompt' is a plain string; give the "
                             "prompt as messages too")
    return record


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for every non-blank line of a JSONL file, `where` being "path:line"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference data file {str(path)!r} does not exist")
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column "
                                 f"{error.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            yield where, validate_record(record, where)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts a text with its bos token (Llama's, Mistral's, Gemma's do; GPT-2's,
    GPT-NeoX's and Qwen's do not): `tokenizer("a")` begins with `bos_token_id`."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    """How many leading tokens the two sequences share."""
    length = 0
    for token, other_token in zip(ids, other, strict=False):
        if token != other_token:
            break
        length += 1
    return length


def tokenize_record(record: dict, tokenizer, where: str, *, max_length: int,
                    max_prompt_length: int | None = None, bos: bool | None = None) -> PreferenceExample:
    """Tokenize and truncate one record (see `load_preference_data`); `bos`: `adds_bos(tokenizer)`, computed
    when not given."""
    prompt_text, chosen_text, rejected_text = _render(record, tokenizer, where)
    bos_ids = [tokenizer.bos_token_id] if (adds_bos(tokenizer) if bos is None else bos) else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    # Each response is tokenized after its prompt, as the model reads it: a SentencePiece tokenizer
    # gives a response's first word no word-start mark ("▁") there, which it would alone. The
    # response is what follows the tokens the prompt and both conversations share (TRL's cut).
    prompt = tokens(prompt_text)
    joint = [tokens(prompt_text + text) for text in (chosen_text, rejected_text)]
    shared = min(common_prefix_length(prompt, ids) for ids in joint)
    prompt = prompt[:shared]
    if bos_ids and prompt[:1] != bos_ids:  # one bos, also where a chat template writes it
        prompt = bos_ids + prompt
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        kept = prompt[:1] if bos_ids and prompt[:1] == bos_ids else []
        prompt = kept + prompt[len(prompt) - (max_prompt_length - len(kept)):]
    if len(prompt) >= max_length:
        raise ValueError(f"{where}: field 'prompt' has {len(prompt)} tokens, which leaves no room for a response "
                         f"within max_length={max_length}; raise max_length or set max_prompt_length below it "
                         "(prompts are then cut from the left)")
    room = max_length - len(prompt)
    responses, truncated = [], []
    for name, ids in (("chosen", joint[0][shared:]), ("rejected", joint[1][shared:])):
        # A response in messages ends as the chat template ends the assistant's turn (as in TRL); a
        # string one with eos, unless it already ends with it.
        if eos and not isinstance(record[name], list) and ids[-1:] != eos:
            ids = ids + eos
        if not ids:
            raise ValueError(f"{where}: field {name!r} tokenizes to nothing")
        responses.append(tuple(ids[:room]))
        truncated.append(len(ids) > room)
    return PreferenceExample(tuple(prompt), responses[0], responses[1], truncated=tuple(truncated))


def load_preference_data(source, tokenizer, *, max_length: int = 512, max_prompt_length: int | None = None,
                         split: str = "train") -> list[PreferenceExample]:
    """Tokenized pairs from a JSONL file, or from a `datasets` dataset (object, or name or path to load).

    Args:
        source: path of a .jsonl file; a `datasets.Dataset`; or, with the `datasets` package
            installed, a name or local directory that `datasets.load_dataset(source, split=split)` accepts
            (a directory whose file names carry the split, see `refuse_unsplit_data_files`), or a directory
            that `datasets`' save_to_disk wrote (`load_saved`).
        tokenizer: a Hugging Face tokenizer (a chat template is needed for message records).
        max_length: most tokens of prompt + response; responses are cut at the end to fit (their eos
            with them; `PreferenceExample.truncated` says which were).
        max_prompt_length: prompts longer than this keep their last tokens (bos kept). A prompt that
            leaves no room for a response within max_length is an error.

    Raises:
        FileNotFoundError: a missing file. ValueError: a malformed record (the message names the
        file, line and field), an empty file, bad lengths, a directory of several data files any of
        whose names carries no split (`datasets` would read them all as these pairs, a held-out file
        too, or leave them out beside split-named ones), or a source `datasets` cannot load (one line
        naming it and why).
    """
    if not (isinstance(max_length, int) and max_length >= 2):
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    if max_prompt_length is not None and not (isinstance(max_prompt_length, int) and 1 <= max_prompt_length
                                              < max_length):
        raise ValueError(f"max_prompt_length must be None or an integer in [1, max_length={max_length}), got "
                         f"{max_prompt_length!r}")
    records: Iterator[tuple[str, dict]]
    if isinstance(source, (str, Path)) and not Path(source).is_dir() and (Path(source).suffix in (".jsonl", ".json")
                                                                          or Path(source).is_file()):
        records = read_jsonl(source)
    else:
        records = _dataset_records(source, split)
    bos = adds_bos(tokenizer)
    examples = [tokenize_record(record, tokenizer, where, max_length=max_length, max_prompt_length=max_prompt_length,
                                bos=bos) for where, record in records]
    if not examples:
        raise ValueError(f"{source}: no preference records found")
    return examples


def split_data_files(directory: Path) -> tuple[list[str], list[str]]:
    """The data files of a directory that `datasets.load_dataset(directory)` reads by their split names
    (train.jsonl and eval.jsonl, data/train-00000-of-00001.jsonl and data/test-...), and those whose
    names carry no split: (named, unsplit), each sorted, relative to the directory.

    When no name carries a split, `datasets` reads every data file as the train split; when some do,
    it reads those alone and leaves the unsplit ones out.

    Raises what `datasets` raises for a directory without data files (EmptyDatasetError, an OSError).
    """
    from datasets.data_files import DEFAULT_PATTERNS_ALL, DataFilesDict, get_data_patterns
    from datasets.load import _ALL_ALLOWED_EXTENSIONS

    base = str(directory.resolve())

    def resolved(patterns: dict) -> set[str]:
        files = DataFilesDict.from_patterns(patterns, base_path=base, allowed_extensions=_ALL_ALLOWED_EXTENSIONS)
        return {os.path.relpath(path, base) for split_files in files.values() for path in split_files}

    patterns = get_data_patterns(base)
    named = set() if patterns == DEFAULT_PATTERNS_ALL else resolved(patterns)
    return sorted(named), sorted(resolved(DEFAULT_PATTERNS_ALL) - named)


def data_format(name: str) -> str:
    """The format of a data file by its name: its extension before any compression suffix, with the JSON
    variants as one ("json" for .json, .jsonl, .jsonl.gz)."""
    suffixes = [suffix.lower() for suffix in Path(name).suffixes if suffix.lower() not in (".gz", ".bz2", ".xz", ".zst",
                                                                                           ".zip", ".lz4")]
    extension = suffixes[-1].lstrip(".") if suffixes else ""
    return "json" if extension in ("json", "jsonl") else extension


def refuse_unsplit_data_files(source, directory: Path) -> None:
    """A ValueError (one line naming them) when the directory holds more than one data file and any of their
    names carries no split (`split_data_files`): `datasets` would read them all as the pairs, a held-out file
    too, or leave them out beside split-named ones. A directory of one data file is its train split."""
    named, unsplit = split_data_files(directory)
    if named:
        # `datasets` reads the split-named files with the builder of their format: an unsplit file of
        # another format (a LICENSE.txt beside train.jsonl) is not one of these pairs.
        formats = {data_format(name) for name in named}
        unsplit = [name for name in unsplit if data_format(name) in formats]
    if not unsplit or len(named) + len(unsplit) == 1:
        return
    listed = ", ".join(unsplit[:4]) + (", ..." if len(unsplit) > 4 else "")
    if not named:
        raise ValueError(f"{source} is a directory of {len(unsplit)} data files ({listed}) whose names carry no "
                         "split (train / validation / test): `datasets` would read them all as these pairs, a "
                         "held-out file too; pass the .jsonl file of the pairs itself, or name the files by split "
                         "(train.jsonl, test.jsonl)")
    raise ValueError(f"{source} holds data files whose names carry no split ({listed}) beside split-named "
                     "ones: `datasets` would read the split-named ones alone and leave these out; name each by "
                     "split (train.jsonl, test.jsonl) or move it out of the directory")


def unloadable(source, error: OSError) -> ValueError:
    """The one-line error for a source `datasets` cannot load, naming it and why."""
    return ValueError(f"{source!r} is neither a .jsonl file nor a `datasets` dataset that loads "
                      f"({type(error).__name__}: {first_line(error)})")


def saved_to_disk(directory: Path) -> bool:
    """Whether the directory is what `datasets`' save_to_disk writes: a Dataset's (state.json and
    dataset_info.json beside its .arrow shards) or a DatasetDict's (dataset_dict.json, a folder per split)."""
    from datasets import config

    return ((directory / config.DATASET_STATE_JSON_FILENAME).is_file()
            and (directory / config.DATASET_INFO_FILENAME).is_file()) or (
        directory / config.DATASETDICT_JSON_FILENAME).is_file()


def load_saved(source, split: str):
    """The pairs of a save_to_disk directory (`datasets.load_from_disk`): a Dataset whole, whichever split is
    asked (it is one table, as a .jsonl file is); a DatasetDict's split of that name (one line naming its
    splits when it has none)."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(source))
    except (OSError, ValueError) as error:  # a missing or corrupt shard or state file
        raise ValueError(f"{source!r} is a `datasets` save_to_disk directory that does not load "
                         f"({type(error).__name__}: {first_line(error)})") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise ValueError(f"{source!r} has no {split!r} split that `datasets` can load (it holds "
                             f"{', '.join(saved)})")
        return saved[split]
    return saved


def _dataset_records(source, split: str) -> Iterator[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{source!r} is not a .jsonl file; loading Hugging Face datasets needs the `datasets` "
                         "package (pip install datasets)") from None
    directory = isinstance(source, (str, Path)) and Path(source).is_dir()
    if isinstance(source, datasets.Dataset):
        dataset = source
    elif directory and saved_to_disk(Path(source)):
        dataset = load_saved(source, split)
    else:
        try:
            if directory:
                refuse_unsplit_data_files(source, Path(source))
        except OSError as error:  # a directory without data files (datasets' EmptyDatasetError)
            raise unloadable(source, error) from None
        try:
            dataset = datasets.load_dataset(str(source) if isinstance(source, Path) else source, split=split)
        except OSError as error:  # no such file or dataset, the Hub unreachable (ConnectionError is an OSError)
            raise unloadable(source, error) from None
        except ValueError as error:  # e.g. no split of that name
            raise ValueError(f"{source!r} has no {split!r} split that `datasets` can load "
                             f"({first_line(error)})") from None
    for row, record in enumerate(dataset):
        where = f"{getattr(dataset.info, 'dataset_name', None) or source}[{split}] row {row}"
        yield where, validate_record(dict(record), where)


def examples_digest(examples: Sequence[PreferenceExample]) -> "hashlib._Hash":
    """A sha256 object fed with every pair's token ids (lengths first, so that boundaries count)."""
    digest = hashlib.sha256()
    for example in examples:
        for ids in (example.prompt, example.chosen, example.rejected):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return digest


def shifted_sequence(prompt: Sequence[int], response: Sequence[int],
                     ignore_index: int) -> tuple[list[int], list[int]]:
    """Model inputs and labels of prompt + response: the next token, masked on the prompt."""
    ids = [*prompt, *response]
    labels = [ignore_index] * (len(prompt) - 1) + list(response)
    return ids[:-1], labels


def pad_rows(rows: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_token_id: int,
             ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), int64 [S, T]: `shifted_sequence` rows padded on the right."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.int64)
    labels = torch.full((len(rows), width), ignore_index, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for row, (ids, lab) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(ids)] = 1
    return input_ids, mask, labels


def collate(examples: Sequence[PreferenceExample], indices: Sequence[int], *, pad_token_id: int,
            packed: bool = False, ignore_index: int = -100) -> PreferenceBatch:
    """A batch of P pairs, padded on the right to the longest sequence, or packed back to back."""
    rows = [shifted_sequence(e.prompt, e.chosen, ignore_index) for e in examples]
    rows += [shifted_sequence(e.prompt, e.rejected, ignore_index) for e in examples]
    index = torch.tensor(list(indices), dtype=torch.int64)
    if packed:
        lengths = torch.tensor([len(ids) for ids, _ in rows])
        return PreferenceBatch(
            input_ids=torch.tensor([[t for ids, _ in rows for t in ids]]),
            labels=torch.tensor([t for _, labels in rows for t in labels]),
            position_ids=torch.cat([torch.arange(n) for n in lengths.tolist()]).unsqueeze(0),
            cu_seqlens=torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32),
            indices=index, ignore_index=ignore_index)
    input_ids, mask, labels = pad_rows(rows, pad_token_id=pad_token_id, ignore_index=ignore_index)
    return PreferenceBatch(input_ids=input_ids, labels=labels, attention_mask=mask, indices=index,
                           ignore_index=ignore_index)


class PreferenceLoader:
    """Shuffled batches of pairs, endless over epochs, with a position that checkpoints can restore.

    Each global batch holds `batch_size` pairs of a seeded per-epoch permutation (the last partial
    batch of an epoch is dropped); rank r of `world_size` gets its contiguous share of
    batch_size / world_size pairs. `state_dict()` is the position (epoch, batch in epoch).
    """

    def __init__(self, examples: Sequence[PreferenceExample], batch_size: int, *, pad_token_id: int,
                 packed: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 ignore_index: int = -100) -> None:
        if batch_size < world_size or batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size} pairs) must be a positive multiple of the number of "
                             f"processes ({world_size})")
        if len(examples) < batch_size:
            raise ValueError(f"the data has {len(examples)} pairs, fewer than one batch of {batch_size}")
        self.examples, self.batch_size = examples, batch_size
        self.pad_token_id, self.packed, self.ignore_index = pad_token_id, packed, ignore_index
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.examples) // self.batch_size

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    def next_batch(self) -> PreferenceBatch:
        """This rank's share of the next global batch."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = self.position * self.batch_size
        local = self.batch_size // self.world_size
        indices = self._order[start + self.rank * local:start + (self.rank + 1) * local]
        self.position += 1
        return collate([self.examples[i] for i in indices], indices, pad_token_id=self.pad_token_id,
                       packed=self.packed, ignore_index=self.ignore_index)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


def eval_batches(examples: Sequence[PreferenceExample], batch_size: int, *, pad_token_id: int,
                 packed: bool = False, ignore_index: int = -100) -> Iterator[PreferenceBatch]:
    """All pairs in order, in batches of at most `batch_size` pairs (the last may be smaller)."""
    for start in range(0, len(examples), batch_size):
        indices = range(start, min(start + batch_size, len(examples)))
        yield collate([examples[i] for i in indices], indices, pad_token_id=pad_token_id, packed=packed,
                      ignore_index=ignore_index)

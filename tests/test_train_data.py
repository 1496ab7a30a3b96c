"""Preference data: the byte tokenizer, JSONL parsing and its errors, truncation, batches, the task."""

import copy
import json
import re
import sys
import types

import pytest
import torch
import train_tokenizers
from transformers import AutoTokenizer

from fdpo.train import PreferenceExample, PreferenceLoader, byte_tokenizer, collate, load_preference_data, task_reward
from fdpo.train.data import tokenize_record
from fdpo.train.models import builtin_tokenizer
from fdpo.train.tasks import bundled_data, generate, prompt_digits


@pytest.fixture(scope="module")
def tokenizer():
    return builtin_tokenizer()


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_byte_tokenizer_round_trips_and_saves(tokenizer, tmp_path):
    text = "sort: 3 1 2\nété"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (256, 257, 258)
    assert len(tokenizer) == 259
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.eos_token_id == 258 and loaded.chat_template == tokenizer.chat_template


def test_plain_records_are_tokenized_with_bos_and_eos(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "chosen": "c", "rejected": "de"}, ""])
    [example] = load_preference_data(path, tokenizer)
    assert example == PreferenceExample((257, 97, 98), (99, 258), (100, 101, 258))


def test_message_records_use_the_chat_template(tokenizer, tmp_path):
    record = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yo"}],
              "rejected": "no"}
    [example] = load_preference_data(write_jsonl(tmp_path / "m.jsonl", [record]), tokenizer)
    assert bytes(example.prompt[1:]).decode() == "user: hi\nassistant: "
    assert bytes(example.chosen).decode() == "yo\n", "the template ends the turn: no eos added"
    assert example.rejected == (*b"no", 258), "a string response gets its eos"


def test_a_chat_template_that_closes_turns_with_eos_gets_no_second_one(tokenizer, tmp_path):
    """Templates such as Qwen's end each turn with the eos token itself ("<|im_end|>"): the response
    then ends there once, not with a second eos the model would learn to emit."""
    closing = copy.deepcopy(tokenizer)
    closing.chat_template = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}"
                             "<|eos|>\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    record = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yo"}],
              "rejected": "no"}
    [example] = load_preference_data(write_jsonl(tmp_path / "m.jsonl", [record]), closing)
    assert example.chosen == (*b"yo", 258, *b"\n") and example.chosen.count(258) == 1
    assert example.rejected == (*b"no", 258), "a plain response still gets its eos"


def thinking_template(tokenizer):
    """A DeepSeek-R1-style template: its generation prompt opens the assistant's turn with "<think>\n",
    which a rendered assistant message does not carry."""
    thinking = copy.deepcopy(tokenizer)
    thinking.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}<U>{{ m['content'] }}{% else %}"
                              "<A>{{ m['content'] }}<|eos|>{% endif %}{% endfor %}"
                              "{% if add_generation_prompt %}<A><think>\n{% endif %}")
    return thinking


def test_a_generation_prompt_the_conversation_lacks_is_neither_prompt_nor_response(tokenizer, tmp_path):
    """The prompt is the common prefix of the generation prompt and both conversations (as TRL cuts it):
    the assistant header is prompt, once, and only the responses are scored."""
    record = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
              "rejected": [{"role": "assistant", "content": "no"}]}
    [example] = load_preference_data(write_jsonl(tmp_path / "m.jsonl", [record]), thinking_template(tokenizer))
    assert bytes(example.prompt[1:]).decode() == "<U>hi<A>"
    assert example.chosen == (*b"yes", 258) and example.rejected == (*b"no", 258)  # the template's eos
    batch = collate([example], [0], pad_token_id=tokenizer.pad_token_id)
    scored = batch.labels[0][batch.labels[0] != -100].tolist()
    assert scored == [*b"yes", 258], "only the chosen response is scored"


def test_responses_that_start_like_the_generation_prompts_tail_keep_their_characters(tokenizer, tmp_path):
    """Both responses begin with "<t", the start of the generation prompt's "<think>": the cut stops
    where the assistant's content begins, not inside the responses."""
    record = {"prompt": [{"role": "user", "content": "hi"}],
              "chosen": [{"role": "assistant", "content": "<table>1</table>"}],
              "rejected": [{"role": "assistant", "content": "<tr>2</tr>"}]}
    [example] = load_preference_data(write_jsonl(tmp_path / "m.jsonl", [record]), thinking_template(tokenizer))
    assert bytes(example.prompt[1:]).decode() == "<U>hi<A>"
    assert example.chosen == (*b"<table>1</table>", 258) and example.rejected == (*b"<tr>2</tr>", 258)


@pytest.mark.parametrize("responses", ["messages", "strings"])
def test_a_template_that_closes_a_lone_prompt_with_eos_is_accepted(tokenizer, tmp_path, responses):
    """Phi-3's template ends a conversation without a generation prompt with the eos token, which the
    rendered conversation never contains there."""
    phi = copy.deepcopy(tokenizer)
    phi.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}")
    answer = {"messages": [{"role": "assistant", "content": "yes"}], "strings": "yes"}[responses]
    record = {"prompt": [{"role": "user", "content": "hi"}], "chosen": answer, "rejected": answer}
    [example] = load_preference_data(write_jsonl(tmp_path / "m.jsonl", [record]), phi)
    assert bytes(example.prompt[1:]).decode() == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    chosen = bytes(t for t in example.chosen if t < 256).decode()
    assert chosen == ("yes<|end|>\n" if responses == "messages" else "yes")


@pytest.mark.parametrize("thinking", [False, True])
def test_responses_that_repeat_the_prompt_are_refused(tokenizer, tmp_path, thinking):
    """chosen / rejected lists that restate the user's turn would score it (and the prompt twice)."""
    user = {"role": "user", "content": "sort 3 1 2"}
    record = {"prompt": [user], "chosen": [user, {"role": "assistant", "content": "1 2 3"}],
              "rejected": [user, {"role": "assistant", "content": "3 2 1"}]}
    template = thinking_template(tokenizer) if thinking else tokenizer
    with pytest.raises(ValueError, match=r"m\.jsonl:1: field 'chosen' must start with the assistant's message, got "
                                         r"role 'user'"):
        load_preference_data(write_jsonl(tmp_path / "m.jsonl", [record]), template)


def test_a_string_response_with_a_template_that_reopens_the_turn_is_refused(tokenizer, tmp_path):
    """With such a template a string response would follow the generation prompt and a message one the
    shorter common prefix: the two responses would not share one prompt."""
    record = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
              "rejected": "no"}
    with pytest.raises(ValueError, match="one response is a string and the other messages"):
        load_preference_data(write_jsonl(tmp_path / "m.jsonl", [record]), thinking_template(tokenizer))


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "a", "chosen": "b"}', "d.jsonl:2: field 'rejected' is missing"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', "d.jsonl:2: field 'chosen' is empty"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "d.jsonl:2: field 'chosen' must be a string or a list"),
    ('{"prompt": "a", "chosen": [{"role": "x"}], "rejected": "c"}', "d.jsonl:2: field 'chosen' must be a non-empty"),
    ('{"prompt": "a", "chosen": "b", "rejected": [{"role": "a", "content": "c"}]}',
     "d.jsonl:2: field 'rejected' is a message list but 'prompt' is a plain string"),
    ('{"prompt": "a", ', "d.jsonl:2: not valid JSON"),
    ('["a", "b", "c"]', "d.jsonl:2: a record must be a JSON object"),
])
def test_malformed_records_name_file_line_and_field(tokenizer, tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, line])
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        load_preference_data(path, tokenizer)


def test_missing_and_empty_files(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_preference_data(tmp_path / "nope.jsonl", tokenizer)
    with pytest.raises(ValueError, match="no preference records"):
        load_preference_data(write_jsonl(tmp_path / "e.jsonl", []), tokenizer)


def test_truncation(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "abcdefgh", "chosen": "xyz", "rejected": "uvwxyz"}])
    [example] = load_preference_data(path, tokenizer, max_length=8, max_prompt_length=4)
    assert example.prompt == (257, *b"fgh")                       # bos kept, prompt cut from the left
    assert example.chosen == (*b"xyz", 258)
    assert example.rejected == tuple(b"uvwx")                      # cut at the end to max_length
    with pytest.raises(ValueError, match=r"t.jsonl:1: field 'prompt' has 9 tokens.*max_length=8"):
        load_preference_data(path, tokenizer, max_length=8)
    with pytest.raises(ValueError, match="max_prompt_length must be"):
        load_preference_data(path, tokenizer, max_length=8, max_prompt_length=8)


def independent_rows(example: PreferenceExample, response):
    """Inputs and labels built token by token: label t is token t+1, scored only if it is a response token."""
    sequence = list(example.prompt) + list(response)
    inputs, labels = [], []
    for t in range(len(sequence) - 1):
        inputs.append(sequence[t])
        labels.append(sequence[t + 1] if t + 1 >= len(example.prompt) else -100)
    return inputs, labels


def test_padded_and_packed_batches():
    examples = [PreferenceExample((1, 5, 6), (7, 8, 2), (9, 2)), PreferenceExample((1, 3), (4, 2), (5, 6, 7, 2))]
    rows = [independent_rows(e, e.chosen) for e in examples] + [independent_rows(e, e.rejected) for e in examples]
    padded = collate(examples, [4, 9], pad_token_id=0)
    assert padded.indices.tolist() == [4, 9] and padded.num_pairs == 2
    for row, (inputs, labels) in enumerate(rows):
        width = len(inputs)
        assert padded.input_ids[row, :width].tolist() == inputs
        assert padded.labels[row, :width].tolist() == labels
        assert padded.attention_mask[row].tolist() == [1] * width + [0] * (padded.input_ids.shape[1] - width)
        assert (padded.labels[row, width:] == -100).all()
    packed = collate(examples, [4, 9], pad_token_id=0, packed=True)
    assert packed.input_ids[0].tolist() == [t for inputs, _ in rows for t in inputs]
    assert packed.labels.tolist() == [t for _, labels in rows for t in labels]
    assert packed.cu_seqlens.tolist() == [0, 5, 8, 12, 17]          # sequences of 6, 4, 5, 6 tokens
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert packed.num_tokens == padded.num_tokens == 3 + 2 + 2 + 4


def test_loader_is_seeded_resumable_and_sharded():
    examples = [PreferenceExample((1,), (i, 2), (i + 1, 2)) for i in range(10)]
    loader = PreferenceLoader(examples, 4, pad_token_id=0, seed=3)
    seen = [loader.next_batch().indices.tolist() for _ in range(5)]       # 2 batches per epoch
    assert sorted(seen[0] + seen[1]) == sorted(set(seen[0] + seen[1])) and seen[0] != seen[2]
    again = PreferenceLoader(examples, 4, pad_token_id=0, seed=3)
    again.next_batch()
    state = again.state_dict()
    resumed = PreferenceLoader(examples, 4, pad_token_id=0, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch().indices.tolist() for _ in range(4)] == seen[1:]
    shards = [PreferenceLoader(examples, 4, pad_token_id=0, seed=3, rank=r, world_size=2) for r in range(2)]
    assert [i for s in shards for i in s.next_batch().indices.tolist()] == seen[0]
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        PreferenceLoader(examples, 3, pad_token_id=0, world_size=2)


def test_task_reward_rule():
    prompt = "sort: 3 1 2\n"
    assert prompt_digits(prompt) == ["3", "1", "2"]
    assert task_reward(prompt, "1 2 3") == 1.0
    assert task_reward(prompt, " 1 2 3\nmore") == 1.0
    assert task_reward(prompt, "3 1 2") == pytest.approx(0.5 + 0.5 * 1 / 2)     # all digits, 1 of 2 pairs in order
    assert task_reward(prompt, "1 2 4") == pytest.approx(0.5 * 2 / 3 + 0.5)      # 2 of 3 digits, in order
    assert task_reward(prompt, "1 2 3 3") == pytest.approx(0.5 * 3 / 4 + 0.5)    # an extra digit: n = 4
    assert task_reward(prompt, "2") == pytest.approx(0.5 * 1 / 3)                # 1 of 3 digits, no pair
    assert task_reward(prompt, "a b c") == 0.0 and task_reward(prompt, "xyz") == 0.0
    assert task_reward(prompt, "") == 0.0
    with pytest.raises(ValueError, match="starts with 'sort:'"):
        task_reward("reverse: 1 2", "2 1")


def test_bundled_data_is_the_generator_output_and_consistent_with_the_rule():
    for split, records in generate().items():
        lines = bundled_data(split).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == records
        for record in records:
            assert task_reward(record["prompt"], record["chosen"]) == 1.0
            assert task_reward(record["prompt"], record["rejected"]) < 1.0
    train = {r["prompt"] for r in generate()["train"]}
    assert not train & {r["prompt"] for r in generate()["eval"]}


def test_datasets_sources_need_the_datasets_package(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match="needs the `datasets` package"):
        load_preference_data("org/some-dataset", tokenizer)


def test_datasets_sources_are_loaded_and_validated_row_by_row(tokenizer, monkeypatch):
    """`datasets` is optional and not installed for the tests: a stand-in module with its two entry points."""
    calls = []

    class Dataset(list):
        info = types.SimpleNamespace(dataset_name="pairs")

    def load_dataset(name, split):
        calls.append((name, split))
        return Dataset([{"prompt": "a", "chosen": "b", "rejected": "c", "extra": 1},
                        {"prompt": "a", "chosen": "b", "rejected": ""}][:2 if name == "org/bad" else 1])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(Dataset=Dataset, load_dataset=load_dataset))
    assert load_preference_data("org/good", tokenizer, split="test") == [PreferenceExample((257, 97), (98, 258),
                                                                                          (99, 258))]
    assert calls == [("org/good", "test")]
    with pytest.raises(ValueError, match=r"pairs\[train\] row 1: field 'rejected' is empty"):
        load_preference_data("org/bad", tokenizer)
    rows = Dataset([{"prompt": "x", "chosen": "y", "rejected": "z"}])
    assert len(load_preference_data(rows, tokenizer)) == 1 and len(calls) == 2


def test_batch_moves_to_a_device():
    batch = collate([PreferenceExample((1,), (2,), (3,))], [0], pad_token_id=0, packed=True).to("cpu")
    assert batch.attention_mask is None and batch.cu_seqlens.dtype == torch.int32


def pairs(tag: str, count: int) -> list[dict]:
    return [{"prompt": f"{tag}{i}", "chosen": "b", "rejected": "c"} for i in range(count)]


def test_a_directory_with_split_names_loads_its_splits(tokenizer, tmp_path, monkeypatch):
    """`datasets` infers the splits of a directory from its file names: a Hub-style copy (data/train-00000-of-
    00001.jsonl, data/test-...) and train.jsonl + eval.jsonl give the training pairs for 'train' and the held-out
    ones for 'test'; a directory of one data file is its 'train' split."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    hub, plain, single = tmp_path / "hub", tmp_path / "plain", tmp_path / "single"
    (hub / "data").mkdir(parents=True)
    plain.mkdir()
    single.mkdir()
    write_jsonl(hub / "data" / "train-00000-of-00001.jsonl", pairs("t", 3))
    write_jsonl(hub / "data" / "test-00000-of-00001.jsonl", pairs("h", 2))
    (hub / "README.md").write_text("# pairs\n", encoding="utf-8")
    write_jsonl(plain / "train.jsonl", pairs("t", 3))
    write_jsonl(plain / "eval.jsonl", pairs("h", 2))
    write_jsonl(single / "pairs.jsonl", pairs("t", 3))
    train = load_preference_data(write_jsonl(tmp_path / "train.jsonl", pairs("t", 3)), tokenizer)
    held_out = load_preference_data(write_jsonl(tmp_path / "eval.jsonl", pairs("h", 2)), tokenizer)
    for folder in (hub, plain):
        assert load_preference_data(str(folder), tokenizer) == train
        assert load_preference_data(folder, tokenizer, split="test") == held_out
    assert load_preference_data(str(single), tokenizer) == train
    # A directory of one data file has no 'test' split: one line naming the source and the split.
    no_test = re.escape(f"'{single}' has no 'test' split that `datasets` can load (Unknown split")
    with pytest.raises(ValueError, match=no_test):
        load_preference_data(str(single), tokenizer, split="test")


def test_a_directory_without_split_names_or_a_source_datasets_cannot_load_is_a_one_line_error(tokenizer, tmp_path,
                                                                                               monkeypatch, capsys):
    """`datasets` reads every data file of a directory whose file names carry no split as one split, a held-out
    file too: such a directory of several files is refused, naming them. A name it cannot load (a typo sent to an
    unreachable Hub, no such files) is one line naming it, not a traceback."""
    import datasets

    from fdpo.train.cli import main

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "pairs"
    folder.mkdir()
    write_jsonl(folder / "pairs.jsonl", pairs("t", 1))
    write_jsonl(folder / "heldout.jsonl", pairs("h", 1))
    (folder / "README.md").write_text("# pairs\n", encoding="utf-8")
    for split in ("train", "test"):
        with pytest.raises(ValueError, match=f"{folder} is a directory of 2 data files "
                                             "\\(heldout.jsonl, pairs.jsonl\\) whose names carry no split"):
            load_preference_data(str(folder), tokenizer, split=split)
    assert main(["--data", str(folder), "--output-dir", str(tmp_path / "run"), "--backend", "torch"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "names carry no split" in error
    for failure in (ConnectionError("Couldn't reach 'data/train' on the Hub (LocalEntryNotFoundError)\nretried"),
                    FileNotFoundError("Couldn't find any data file at /somewhere/data/train.")):
        def load_dataset(name, split, failure=failure):
            raise failure

        monkeypatch.setattr(datasets, "load_dataset", load_dataset)
        with pytest.raises(ValueError) as caught:
            load_preference_data("data/train", tokenizer)
        message = str(caught.value)
        assert "\n" not in message and message.startswith("'data/train' is neither a .jsonl file nor a `datasets`")
        assert f"({type(failure).__name__}: {str(failure).splitlines()[0]})" in message


def test_a_directory_of_split_named_and_unsplit_files_is_refused_naming_the_unsplit_ones(tokenizer, tmp_path,
                                                                                          monkeypatch):
    """`datasets` reads only the split-named files of a directory where some names carry a split: train.jsonl
    beside notes.jsonl, or a Hub-style data/train-00000-of-00001.jsonl beside extra.jsonl, would load without
    the unsplit file. Such a directory is refused for every split, naming the unsplit files."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    plain, hub = tmp_path / "plain", tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    plain.mkdir()
    write_jsonl(plain / "train.jsonl", pairs("t", 2))
    write_jsonl(plain / "notes.jsonl", pairs("n", 5))
    write_jsonl(hub / "data" / "train-00000-of-00001.jsonl", pairs("t", 2))
    write_jsonl(hub / "extra.jsonl", pairs("n", 5))
    for folder, unsplit in ((plain, "notes.jsonl"), (hub, "extra.jsonl")):
        for split in ("train", "test"):
            with pytest.raises(ValueError) as caught:
                load_preference_data(str(folder), tokenizer, split=split)
            message = str(caught.value)
            assert "\n" not in message
            assert message.startswith(f"{folder} holds data files whose names carry no split ({unsplit}) beside "
                                      "split-named ones: `datasets` would read the split-named ones alone")
    # A file of another format beside the split-named ones (a license) is no pair file: the directory loads.
    licensed = tmp_path / "licensed"
    licensed.mkdir()
    write_jsonl(licensed / "train.jsonl", pairs("t", 2))
    write_jsonl(licensed / "test.jsonl", pairs("h", 1))
    (licensed / "LICENSE.txt").write_text("MIT\n", encoding="utf-8")
    assert load_preference_data(str(licensed), tokenizer) == load_preference_data(licensed / "train.jsonl", tokenizer)


def test_a_save_to_disk_directory_is_loaded_with_load_from_disk(tokenizer, tmp_path, monkeypatch):
    """A directory that `datasets`' save_to_disk wrote (.arrow shards, state.json, dataset_info.json) is no set of
    data files to name by split: a Dataset's is the pairs whichever split is asked, as a .jsonl file is, and a
    DatasetDict's gives the split asked for (one line naming its splits when it lacks it)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    train = load_preference_data(write_jsonl(tmp_path / "train.jsonl", pairs("t", 3)), tokenizer)
    held_out = load_preference_data(write_jsonl(tmp_path / "eval.jsonl", pairs("h", 2)), tokenizer)
    datasets.Dataset.from_list(pairs("t", 3)).save_to_disk(str(tmp_path / "saved"))
    assert load_preference_data(str(tmp_path / "saved"), tokenizer) == train
    assert load_preference_data(tmp_path / "saved", tokenizer, split="test") == train
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(pairs("t", 3)),
                                   "test": datasets.Dataset.from_list(pairs("h", 2))})
    splits.save_to_disk(str(tmp_path / "splits"))
    assert load_preference_data(str(tmp_path / "splits"), tokenizer) == train
    assert load_preference_data(str(tmp_path / "splits"), tokenizer, split="test") == held_out
    with pytest.raises(ValueError, match=re.escape(f"'{tmp_path / 'splits'}' has no 'validation' split that "
                                                   "`datasets` can load (it holds train, test)")):
        load_preference_data(str(tmp_path / "splits"), tokenizer, split="validation")


# Tokenization against real tokenizer kinds (offline stand-ins, tests/train_tokenizers.py) and TRL.

def bundled_rows(count: int) -> list[dict]:
    with open(bundled_data("train"), encoding="utf-8") as f:
        return [json.loads(line) for line in f][:count]


def fdpo_tokenized(tokenizer, rows):
    examples = [tokenize_record(row, tokenizer, f"row {i}", max_length=4096) for i, row in enumerate(rows)]
    return [(list(e.prompt), list(e.chosen), list(e.rejected)) for e in examples]


QUESTION = "Question: What is the capital of France? Answer:"
ENGLISH_ROWS = [{"prompt": QUESTION, "chosen": " Paris.", "rejected": " Lyon."},
                {"prompt": QUESTION + " ", "chosen": "Paris.", "rejected": "Lyon."}]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_responses_are_tokenized_after_their_prompt_as_trl_does(kind, tmp_path):
    """A SentencePiece tokenizer marks a word start ("▁") on the first word of a text: a response
    tokenized alone trained "\\n 0 4 6" for "\\n0 4 6". Tokenized with its prompt, the pairs are
    TRL's, token for token, and decode to the text given."""
    tokenizer = train_tokenizers.llama_like() if kind == "llama" else train_tokenizers.gpt2_like()
    rows = bundled_rows(40) + ENGLISH_ROWS
    ours = fdpo_tokenized(tokenizer, rows)
    assert ours == train_tokenizers.trl_tokenized(tokenizer, rows, tmp_path)
    for row, (prompt, chosen, _) in zip(rows, ours, strict=True):
        assert tokenizer.decode(prompt + chosen, skip_special_tokens=True) == row["prompt"] + row["chosen"]
    if kind == "llama":
        first = tokenizer.convert_ids_to_tokens(ours[0][1])[0]
        assert not first.startswith("\u2581"), first


@pytest.mark.parametrize("template", ["llama3", "chatml"])
def test_message_rows_match_trl_and_end_as_the_template_ends_the_turn(template, tmp_path):
    """Message rows are tokenized as TRL does: after the prompt, with the template's end of turn and no
    eos after it (ChatML with the base eos "<|endoftext|>" scored [..., "<|im_end|>", "\\n", eos]); a
    template that writes bos keeps one."""
    if template == "llama3":
        tokenizer = train_tokenizers.llama_like()
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                                    "<|eot_id|>"]})
        tokenizer.chat_template = train_tokenizers.LLAMA3
    else:
        tokenizer = train_tokenizers.gpt2_like()
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.chat_template = train_tokenizers.CHATML
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in bundled_rows(20)]
    ours = fdpo_tokenized(tokenizer, rows)
    assert ours == train_tokenizers.trl_tokenized(tokenizer, rows, tmp_path)
    end = "<|eot_id|>" if template == "llama3" else "\u010a"  # ChatML's turn ends "<|im_end|>\n"
    for prompt, chosen, _ in ours:
        assert tokenizer.convert_ids_to_tokens(chosen)[-1] == end and tokenizer.eos_token_id not in chosen
        if template == "llama3":
            assert prompt[0] == tokenizer.bos_token_id and prompt.count(tokenizer.bos_token_id) == 1


def test_bos_follows_the_tokenizer(tokenizer):
    """GPT-2-style tokenizers never add bos (their bos is "<|endoftext|>"): a prompt does not start with
    it. Llama-style ones and the built-in one add it, once; a plain byte tokenizer adds none."""
    record = {"prompt": "sort: 3 1 2\n", "chosen": "1 2 3", "rejected": "3 2 1"}
    gpt2 = train_tokenizers.gpt2_like()
    example = tokenize_record(record, gpt2, "r", max_length=64)
    assert list(example.prompt) == gpt2(record["prompt"])["input_ids"] and gpt2.bos_token_id not in example.prompt
    llama = train_tokenizers.llama_like()
    example = tokenize_record(record, llama, "r", max_length=64)
    assert example.prompt[0] == llama.bos_token_id and example.prompt.count(llama.bos_token_id) == 1
    assert tokenize_record(record, tokenizer, "r", max_length=64).prompt == (257, *b"sort: 3 1 2\n")
    assert tokenize_record(record, byte_tokenizer(), "r", max_length=64).prompt == tuple(b"sort: 3 1 2\n")
    prompt = tokenize_record(record, tokenizer, "r", max_length=64, max_prompt_length=4).prompt
    assert prompt == (257, *b" 2\n"), "bos kept when the prompt is cut"


def test_only_a_final_eos_counts_as_the_responses_end(tokenizer):
    """A response holding the eos text mid-way still ends with eos; one ending with it gets no second."""
    record = {"prompt": "p", "chosen": "a<|eos|>b", "rejected": "c<|eos|>"}
    example = tokenize_record(record, tokenizer, "r", max_length=64)
    assert example.chosen == (97, 258, 98, 258)
    assert example.rejected == (99, 258)


def test_a_token_merging_across_the_boundary_starts_the_response(tmp_path):
    """A prompt ending in a space that the response's first word takes ("Answer: " + "Paris." is
    "ĠAnswer", ":", "ĠParis"): the prompt stops before the merged token, which the response scores
    with its space, as TRL does; prompt + response still decode to the text given."""
    tokenizer = train_tokenizers.gpt2_like()
    record = {"prompt": QUESTION + " ", "chosen": "Paris.", "rejected": "Lyon."}
    example = tokenize_record(record, tokenizer, "r", max_length=64)
    alone = tokenizer(record["prompt"])["input_ids"]
    assert list(example.prompt) == alone[:-1] and tokenizer.convert_ids_to_tokens(alone)[-1] == "\u0120"
    assert tokenizer.convert_ids_to_tokens(list(example.chosen)) == ["\u0120Paris", ".", "<|endoftext|>"]
    assert tokenizer.decode(example.prompt + example.chosen, skip_special_tokens=True) == QUESTION + " Paris."
    [(prompt, chosen, rejected)] = train_tokenizers.trl_tokenized(tokenizer, [record], tmp_path)
    assert (prompt, chosen, rejected) == (list(example.prompt), list(example.chosen), list(example.rejected))

"""README.md's code runs as written.

Every ```python block runs, in order and each in a fresh namespace, against a shared setup holding
what a training loop already has: a tiny random-weight Llama (`model`, also `policy`), its frozen
copy `ref_model`, a padded batch of 2P = 4 preference rows (`input_ids`, `mask`, `response_mask`;
chosen rows first), an `optimizer` and a checkpoint `path`. The blocks bring their own imports.
Every command of the ```bash blocks names a module that exists, and the flags given to the
trainer and the benchmarks are accepted by their parsers (nothing is run).
"""

import copy
import importlib.util
import re
import shlex
from collections.abc import Callable
from importlib.metadata import metadata
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")


def fenced_blocks(language: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, code) of every ```language block of README.md, in order."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), start=1):
        fence = FENCE.match(line)
        if current is None:
            if fence:
                current, start = (fence.group(1), []), number
        elif fence and not fence.group(1):
            if current[0] == language:
                blocks.append((start, "\n".join(current[1]) + "\n"))
            current = None
        else:
            current[1].append(line)
    assert current is None, f"README.md:{start}: the ```{current[0]} block is never closed"
    return blocks


def shell_commands() -> list[tuple[int, list[str]]]:
    """(line number, argv) of every command in README's ```bash blocks (comments dropped, `\\` lines joined)."""
    commands = []
    for start, code in fenced_blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            for command in re.split(r"&&|;", line.split(" #")[0] if not line.startswith("#") else ""):
                argv = shlex.split(command)
                if argv:
                    commands.append((start, argv))
    return commands


def module_commands() -> list[tuple[int, str, list[str]]]:
    """(line number, module, arguments) of every `... -m module args` command of the bash blocks."""
    found = []
    for start, argv in shell_commands():
        if "-m" in argv:
            at = argv.index("-m")
            found.append((start, argv[at + 1], argv[at + 2:]))
    return found


def readme_setup(tmp_path: Path) -> dict:
    """The names README's Python blocks assume: models, a padded batch of 2 pairs, optimizer, path."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    ref_model = copy.deepcopy(model).requires_grad_(False).eval()
    # Rows 0, 1 chosen and 2, 3 rejected: pair i shares its prompt (the first 4 tokens); rows are
    # right-padded to 12 tokens, response tokens are the non-padding ones after the prompt.
    prompt_length, lengths = 4, torch.tensor([12, 9, 10, 7])
    input_ids = torch.randint(1, config.vocab_size, (4, 12))
    input_ids[2:, :prompt_length] = input_ids[:2, :prompt_length]
    positions = torch.arange(12)
    mask = (positions < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(mask == 0, 0)
    response_mask = (positions >= prompt_length) & mask.bool()
    return {"model": model, "policy": model, "ref_model": ref_model, "input_ids": input_ids, "mask": mask,
            "response_mask": response_mask, "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3),
            "path": tmp_path / "checkpoint.pt"}


PYTHON_BLOCKS = fenced_blocks("python")


def test_readme_has_python_blocks() -> None:
    assert len(PYTHON_BLOCKS) >= 3, "README.md lost its Python examples"


def run_block(line: int, code: str, namespace: dict) -> None:
    """Execute a block so that tracebacks name README.md's own line numbers."""
    exec(compile("\n" * line + code, str(README), "exec"), namespace)


@pytest.mark.parametrize("line, code", PYTHON_BLOCKS, ids=[f"README.md:{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs(line: int, code: str, tmp_path: Path) -> None:
    namespace = readme_setup(tmp_path)
    run_block(line, code, namespace)
    losses = [value for value in (namespace.get("loss"), getattr(namespace.get("out"), "loss", None))
              if isinstance(value, torch.Tensor)]
    assert losses, "the block computes neither `loss` nor `out.loss`"
    for loss in losses:
        assert loss.dim() == 0 and torch.isfinite(loss), f"the block's loss is {loss}"


def test_readme_snippets_save_checkpoints_that_load(tmp_path: Path) -> None:
    """The block that saves the epsilon-DPO controller writes a file a new controller resumes from."""
    import fdpo

    saving = [(line, code) for line, code in PYTHON_BLOCKS if "torch.save" in code]
    assert saving, "README.md no longer shows how to checkpoint the epsilon-DPO controller"
    namespace = readme_setup(tmp_path)
    run_block(*saving[0], namespace)
    restored = fdpo.EpsilonDPO()
    restored.load_state_dict(torch.load(namespace["path"])["controller"])
    assert restored.beta == namespace["controller"].beta


def test_bash_installs_name_real_files_and_extras() -> None:
    """`pip install -c FILE -e ".[extra]"` lines name a file of the repository and extras fdpo declares."""
    extras = set(metadata("fdpo").get_all("Provides-Extra") or [])
    installs = [argv for _, argv in shell_commands() if Path(argv[0]).name == "pip" and "install" in argv]
    assert installs, "README.md shows no install command"
    for argv in installs:
        for flag, value in pairwise(argv):
            if flag == "-c":
                assert (REPO / value).is_file(), f"README.md installs with -c {value}, which does not exist"
            wanted = re.fullmatch(r"\.\[(.+)\]", value)
            if flag == "-e" and wanted:
                missing = set(wanted.group(1).split(",")) - extras
                assert not missing, f"README.md installs extras {sorted(missing)}; fdpo declares {sorted(extras)}"


MODULES = module_commands()


@pytest.mark.parametrize("module", sorted({module for _, module, _ in MODULES}))
def test_bash_modules_exist(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))     # `python -m` in the repository root finds benchmarks/
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"README.md runs `python -m {module}`, which does not exist"
    if spec.submodule_search_locations is not None:
        assert importlib.util.find_spec(f"{module}.__main__") is not None, f"`python -m {module}` has no __main__"


def trainer_args(args: list[str]) -> object:
    from fdpo.train.config import parse_args

    return parse_args(args)


def benchmark_args(args: list[str]) -> object:
    from benchmarks.__main__ import parse_args

    return parse_args(args)


def study_args(args: list[str]) -> object:
    from benchmarks.study import build_parser

    return build_parser().parse_args(args)


# The commands whose arguments can be parsed without running them: module -> parse(argv).
PARSERS: dict[str, Callable[[list[str]], object]] = {
    "fdpo.train": trainer_args, "benchmarks": benchmark_args, "benchmarks.study": study_args}
PARSED = [(line, module, args) for line, module, args in MODULES if module in PARSERS]


def test_bash_blocks_run_the_trainer() -> None:
    assert any(module == "fdpo.train" and args for _, module, args in PARSED), \
        "README.md shows no `python -m fdpo.train` command with flags"


@pytest.mark.parametrize("module, args", [(module, args) for _, module, args in PARSED],
                         ids=[f"README.md:{line}:{module} {' '.join(args)}".strip() for line, module, args in PARSED])
def test_bash_commands_parse(module: str, args: list[str], tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The flags shown are accepted; a `--config` file named is created first, holding one setting."""
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.chdir(tmp_path)
    if "--config" in args:
        (tmp_path / args[args.index("--config") + 1]).write_text("method: dpo\n", encoding="utf-8")
    if "--help" in args:
        with pytest.raises(SystemExit) as stopped:
            PARSERS[module](args)
        assert stopped.value.code == 0
        return
    PARSERS[module](args)     # a flag argparse rejects exits with status 2: the test fails

"""The documentation runs: every ```python block of README.md and docs/*.md is executed (each
file's blocks in order, in one namespace, in a scratch folder), every `scoresde ...` command in
a ```bash block parses with the real CLI parser, every relative link points to a file that
exists, and docs/api.md documents every public name of `scoresde`."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import matplotlib
import pytest
import torch

import scoresde
from scoresde.cli import build_parser

matplotlib.use("Agg")  # a docs example that imports pyplot must not open windows

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted((ROOT / "docs").glob("*.md")) + (
    [ROOT / "README.md"] if (ROOT / "README.md").is_file() else []
)
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)


def _blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_there_are_docs() -> None:
    names = {p.name for p in DOC_FILES}
    for required in (
        "index.md",
        "math.md",
        "solvers.md",
        "api.md",
        "tutorial_2d.md",
        "tutorial_digits.md",
        "own_data.md",
        "distributed.md",
    ):
        assert required in names


@pytest.mark.parametrize("path", DOC_FILES, ids=_name)
def test_python_blocks_run(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    blocks = _blocks(path, "python")
    monkeypatch.chdir(tmp_path)  # examples write their files into a scratch folder
    torch.set_num_threads(1)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{_name(path)}[python block {i + 1}]", "exec"), namespace)
        except Exception as exc:  # name the block: the traceback alone points into exec
            raise AssertionError(f"{_name(path)}: python block {i + 1} failed: {exc!r}") from exc


_SEPARATORS = ("&&", "||", ";", "|", "&")


def _shell_commands(text: str) -> list[list[str]]:
    """The `scoresde ...` commands of a shell block (continuation lines joined, comments and
    other programs' commands dropped), as argv lists without the program name. `scoresde`
    counts as a command at the start of a line or of a pipeline part, after environment
    assignments (`VAR=value scoresde ...`) and after `-m` (`python -m scoresde`, `torchrun
    ... -m scoresde`)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    commands = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        for i, word in enumerate(words):
            before = words[i - 1] if i else None
            starts = before is None or before in _SEPARATORS or before == "-m"
            if word == "scoresde" and (starts or re.fullmatch(r"\w+=\S*", before or "")):
                argv = words[i + 1 :]
                cut = [k for k, w in enumerate(argv) if w in _SEPARATORS]
                commands.append(argv[: cut[0]] if cut else argv)
    return commands


@pytest.mark.parametrize("path", DOC_FILES, ids=_name)
def test_shell_commands_parse(path: Path) -> None:
    parser = build_parser()
    for block in _blocks(path, "bash"):
        for argv in _shell_commands(block):
            if "--help" in argv or "--version" in argv:
                continue
            try:
                parser.parse_args(argv)
            except SystemExit as exc:
                raise AssertionError(f"{_name(path)}: `scoresde {shlex.join(argv)}`") from exc


def test_shell_command_extraction() -> None:
    text = (
        "# comment\nscoresde train two_moons \\\n    --steps 10  # note\n"
        "torchrun -m scoresde demo\nls\nbash x.sh && python3 -m scoresde demo --quick\n"
        "CUDA_VISIBLE_DEVICES=1 scoresde sample run --seed 1 &\npip install scoresde\n"
    )
    assert _shell_commands(text) == [
        ["train", "two_moons", "--steps", "10"],
        ["demo"],
        ["demo", "--quick"],
        ["sample", "run", "--seed", "1"],
    ]


@pytest.mark.parametrize("path", DOC_FILES, ids=_name)
def test_relative_links_resolve(path: Path) -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{_name(path)} links to missing {target}"


def test_api_reference_covers_the_public_names() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in scoresde.__all__ if f"`{name}" not in text]
    assert not missing, f"docs/api.md does not document {missing}"

"""Every fenced code block of README.md and docs/*.md runs or parses, as a reader would use it.

- ```python blocks run in order within each file, in one namespace per file (a later block may use
  the names of an earlier one), in a temporary working directory, under torch's own defaults
  (float32) rather than the test suite's float64.
- ```bash / ```sh / ```console blocks are parsed, not run: every ``pdiff ...`` command (also under
  ``torchrun -m pdiff.cli`` and ``python -m pdiff.cli``) must parse with ``pdiff.cli``'s parser
  (``pdiff bench`` with ``pdiff.bench``'s), every ``python experiments/NAME.py ...`` with that
  experiment's, and every path under ``experiments/`` a block names must exist.
- ```text / ```json (and unlabelled, and other data formats) blocks are output samples and are not
  run; a block in any other language fails ``test_every_block_has_a_known_language``.
- ``<!-- doctest: skip (reason) -->`` on the line before a fence skips that block and reports the
  reason; a skipped python block is still compiled.

Each block is one test, named by file, block index, line and first line.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell", "console", "shell-session"}
# output samples and data formats: never run
OUTPUT = {"", "text", "txt", "plain", "output", "json", "yaml", "toml", "ini", "csv", "diff",
          "markdown", "md"}

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
DIRECTIVE = re.compile(r"^\s*<!--\s*doctest:(?P<body>.*?)-->\s*$")
SKIP = re.compile(r"^\s*skip\s*\((?P<reason>.*\S.*)\)\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    index: int  # among the file's fenced blocks, from 0
    line: int  # of the opening fence, from 1
    lang: str
    source: str
    skip: str | None  # the reason of a skip marker, or None

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT))

    @property
    def first_line(self) -> str:
        return next((ln.strip() for ln in self.source.splitlines() if ln.strip()), "")

    @property
    def id(self) -> str:
        return f"{self.name}-{self.index}-L{self.line}-{self.first_line[:40]}"


def parse_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the skip marker on the line before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        start, body = i, []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and set(lines[i].strip()) == {fence[0]}):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1  # past the closing fence (or the end of an unclosed block)
        prev = start - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        skip = None
        if prev >= 0 and (d := DIRECTIVE.match(lines[prev])):
            s = SKIP.match(d["body"])
            if not s:
                raise ValueError(f"{path.name}:{prev + 1}: unknown doctest directive "
                                 f"{d['body'].strip()!r}; the one known is "
                                 "'<!-- doctest: skip (reason) -->'")
            skip = s["reason"].strip()
        lang = m["info"].strip().split()[0].lower() if m["info"].strip() else ""
        blocks.append(Block(path, len(blocks), start + 1, lang, "\n".join(body) + "\n", skip))
    return blocks


ALL_BLOCKS = [b for p in DOC_FILES for b in parse_blocks(p)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang in PYTHON]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in SHELL]


def _params(blocks):
    return [pytest.param(b, id=b.id) for b in blocks]


def test_the_docs_have_code_blocks():
    """The parser finds the blocks the docs are known to hold (a broken fence regex would
    silently check nothing)."""
    names = {b.name for b in PYTHON_BLOCKS}
    assert {"README.md", "docs/user_guide.md"} <= names
    assert any(b.name == "README.md" for b in SHELL_BLOCKS)


def test_every_block_has_a_known_language():
    """A block in a language this test does not know would go unchecked: name it here."""
    unknown = [f"{b.name}:{b.line} ```{b.lang}" for b in ALL_BLOCKS
               if b.lang not in PYTHON | SHELL | OUTPUT]
    assert not unknown, ("code blocks in a language tests/test_docs.py neither runs nor lists as "
                         f"output: {unknown}")


# -- python blocks -------------------------------------------------------------------------------

class _FileRun:
    """One file's python blocks run in order in one namespace and one working directory."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.namespace: dict = {"__name__": "__main__"}
        self.done: dict[int, BaseException | None] = {}  # block index -> its error, or None


_RUNS: dict[Path, _FileRun] = {}


def _compile(block: Block):
    # padded so that the line numbers of a traceback are those of the Markdown file
    return compile("\n" * block.line + block.source, str(block.path), "exec")


class BlockFailed(Exception):
    """A block raised: the message is its traceback from the block's line on."""


def _exec(block: Block, run: _FileRun) -> None:
    try:
        exec(_compile(block), run.namespace)
    except Exception as e:
        run.done[block.index] = e
        tb = traceback.TracebackException.from_exception(e)
        tb.stack = traceback.StackSummary.from_list(
            [f for f in tb.stack if f.filename != __file__])  # from the Markdown file's line on
        raise BlockFailed(f"the python block at {block.name}:{block.line} failed:\n"
                          + "".join(tb.format())) from None
    run.done[block.index] = None


@pytest.fixture
def reader_defaults(monkeypatch):
    """What a reader's fresh interpreter has: torch's float32 default (tests/conftest.py sets
    float64), matplotlib without a display."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("block", _params(PYTHON_BLOCKS))
def test_python_block_runs(block, tmp_path_factory, monkeypatch, reader_defaults):
    _compile(block)  # a syntax error fails even a skipped block
    if block.skip:
        pytest.skip(f"{block.name}:{block.line}: {block.skip}")
    if block.path not in _RUNS:
        _RUNS[block.path] = _FileRun(tmp_path_factory.mktemp(block.path.stem))
    run = _RUNS[block.path]
    monkeypatch.chdir(run.workdir)
    # the blocks before this one, as a reader runs them (under -k or a rerun of one block)
    for earlier in PYTHON_BLOCKS:
        if (earlier.path == block.path and earlier.index < block.index and not earlier.skip
                and earlier.index not in run.done):
            with contextlib.suppress(BlockFailed):  # recorded in run.done, named below
                _exec(earlier, run)
    failed = [f"line {b.line}" for b in PYTHON_BLOCKS if b.path == block.path
              and b.index < block.index and run.done.get(b.index) is not None]
    try:
        _exec(block, run)
        return
    except BlockFailed as e:
        message = str(e)
    if failed:
        message += (f"\n(earlier blocks of {block.name} failed, at {', '.join(failed)}: this "
                    "failure may follow from theirs)")
    pytest.fail(message, pytrace=False)


# -- shell blocks --------------------------------------------------------------------------------

OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
REDIRECTS = {">", ">>", "<", ">&", "&>", "<<", ">|"}
WRAPPERS = {"time", "/usr/bin/time", "env", "nohup", "exec"}
# Options whose converter looks at the machine (a device present, a file an earlier command of the
# block writes): parsed as plain strings, since the check is of the command's syntax.
MACHINE_DEPENDENT = {"--device", "--include-json"}


def shell_commands(block: Block) -> list[list[str]]:
    """The simple commands of a shell block, each a list of words, with variable assignments,
    redirections and wrappers (``time``, ``env``) removed. ``[--opt VALUE]`` usage brackets are
    read as the option they enclose."""
    text = re.sub(r"\\\n", " ", block.source)
    commands = []
    for line in text.splitlines():
        if block.lang == "console":
            if not line.lstrip().startswith("$ "):
                continue  # output
            line = line.lstrip()[2:]
        line = re.sub(r"\[(\s*-[^\[\]]*)\]", r"\1", line)
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        words, cmd, redirect = list(lex), [], False
        for w in words + [";"]:
            if redirect:
                redirect = False
            elif w in REDIRECTS or re.fullmatch(r"\d*[<>]+&?", w):
                redirect = True
            elif w in OPERATORS:
                if cmd:
                    commands.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return [_unwrap(c) for c in commands if _unwrap(c)]


def _unwrap(cmd: list[str]) -> list[str]:
    cmd = list(cmd)
    while cmd:
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", cmd[0]):
            cmd.pop(0)
        elif cmd[0] in WRAPPERS:
            cmd.pop(0)
            while cmd and cmd[0].startswith("-"):
                cmd.pop(0)
        else:
            return cmd
    return cmd


def _relaxed(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for action in _actions(parser):
        if set(action.option_strings) & MACHINE_DEPENDENT:
            action.type = None
    return parser


def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """argparse's error for ``args``, or None when they parse (``--help`` parses)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as e:
        if e.code not in (0, None):
            return _last_line(err, e)
    return None


def _last_line(err: io.StringIO, e: SystemExit) -> str:
    return (err.getvalue().strip().splitlines() or [f"exit code {e.code}"])[-1]


class _Parsed(Exception):
    """Raised in place of running an experiment's grid: its command line parsed."""


def check_pdiff(args: list[str]) -> str | None:
    from pdiff import bench, cli

    if args[:1] == ["bench"]:  # its own parser, as pdiff.cli.main dispatches it
        return _parse(_relaxed(bench.parser("pdiff bench")), args[1:])
    return _parse(_relaxed(cli.build_parser()), args)


def check_experiment(module: str, args: list[str], monkeypatch) -> str | None:
    common = importlib.import_module("experiments._common")

    def parsed(*a, **k):
        raise _Parsed

    monkeypatch.setattr(common, "compare", parsed)
    monkeypatch.setattr(common, "tune_allocator", lambda: False)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            importlib.import_module(f"experiments.{module}").main(args)
    except _Parsed:
        return None
    except SystemExit as e:
        return _last_line(err, e) if e.code not in (0, None) else None
    return "the command ran past its parser (tests/test_docs.py expected compare to be called)"


def check_command(cmd: list[str], monkeypatch) -> str | None:
    """Why ``cmd`` is wrong, or None. Commands other than pdiff's and python's pass."""
    prog = cmd[0].rsplit("/", 1)[-1]
    if prog == "pdiff":
        return check_pdiff(cmd[1:])
    if prog in ("torchrun", "python", "python3"):
        if "-m" in cmd:
            i = cmd.index("-m")
            module, args = (cmd[i + 1], cmd[i + 2:]) if i + 1 < len(cmd) else ("", [])
            if module == "pdiff.cli":
                return check_pdiff(args)
            if module == "pdiff.bench":
                return check_pdiff(["bench"] + args)
            if module.startswith("experiments."):
                name = module.split(".", 1)[1]
                if not (ROOT / "experiments" / f"{name}.py").is_file():
                    return f"no experiment {module} (experiments/{name}.py)"
                return check_experiment(name, args, monkeypatch)
            return None
        script = next((w for w in cmd[1:] if w.endswith(".py")), None)
        if script and script.startswith("experiments/"):
            if not (ROOT / script).is_file():
                return f"{script} does not exist"
            args = cmd[cmd.index(script) + 1:]
            return check_experiment(Path(script).stem, args, monkeypatch)
    return None


@pytest.mark.parametrize("block", _params(SHELL_BLOCKS))
def test_shell_block_parses(block, monkeypatch):
    if block.skip:
        pytest.skip(f"{block.name}:{block.line}: {block.skip}")
    errors = []
    for word in re.findall(r"(?<![\w./-])experiments/[\w./-]*[\w]", block.source):
        if not (ROOT / word).exists():
            errors.append(f"{word} does not exist")
    for cmd in shell_commands(block):
        why = check_command(cmd, monkeypatch)
        if why:
            errors.append(f"{shlex.join(cmd)}\n    -> {why}")
    assert not errors, f"{block.name}:{block.line}:\n  " + "\n  ".join(errors)

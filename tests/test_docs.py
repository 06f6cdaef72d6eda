# Copyright © 2026 mstream-mlx contributors.
"""Every snippet in README.md and docs/*.md runs, so the docs cannot drift from the code.

What each kind of fenced block gets:

- ```` ```python ````: run in order, one namespace per page (a later snippet may use the
  ``model`` an earlier one loaded), in a scratch folder where ``mstream_mlx/`` and
  ``examples/`` resolve as in the repository root.  Some snippets get a check of what they
  promise (``PROMISES`` below), e.g. that the README's interrupt really fires.
- ```` ```bash ````: every ``mstream-mlx COMMAND ...`` must use only flags that
  ``mstream-mlx COMMAND --help`` lists; the cheap ones on the bundled model (``generate``,
  ``chat``, ``version`` without ``--model``) run.  ``python -m MODULE`` must name a module
  that exists, ``python FILE`` / ``bash FILE`` a file that exists.
- ```` ```json ````: parses (one document, or one per line); with a ``test-data`` marker
  every object is a training line that ``lora``'s data loader accepts for that model.
- An untyped block that starts with ``$ mstream-mlx ...``: the command runs, and every
  line shown must be a line of its output (text after ``<-`` is a comment).

Markers, an HTML comment on the line before a block (visible in the Markdown source):

- ``<!-- no-test: WHY -->``: the block is not run (it needs several Macs, CUDA, ...).
- ``<!-- test-paths: NAME=FIXTURE ... -->``: the quoted string ``"NAME"`` in the snippet is
  replaced by the path of FIXTURE.
- ``<!-- test-data: FIXTURE -->`` before a JSON block: its lines are training data for FIXTURE.

The fixtures: ``bundled`` (the demo model), ``adapters`` / ``fused`` (a 2-step ``lora`` run
on the demo model and its ``fuse``), and random tiny checkpoints in the reference layout:
``tiny-rows`` (10 streams), ``tiny-blocks4`` (system, user, assistant, auditor),
``tiny-qwen3_5`` (a Qwen3.5 hybrid, 3 streams).

A flag named in the prose (inline code such as ``--temp``) must be a flag of some
``mstream-mlx`` command. Relative links (and their ``#anchors``) must point at files and
headings that exist, and no page may point outside the repository (``../shared``).
"""

import importlib.util
import json
import os
import re
import shlex
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
BUNDLED = ROOT / "mstream_mlx" / "assets" / "default_model"
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)
MARKER = re.compile(r"<!--\s*(no-test|test-paths|test-data):?\s*(.*?)\s*-->\s*$")
CHEAP = {"generate", "chat", "version"}  # run in-process on the bundled model
COMMANDS = ("generate", "chat", "convert", "export", "lora", "fuse", "bench", "server")


class Snippet:
    """A fenced block: its page, language, code, first line and marker (if any)."""

    def __init__(self, page: Path, lang: str, code: str, line: int, marker: Tuple[str, str]):
        self.page, self.lang, self.code, self.line = page, lang, code, line
        kind, value = marker
        self.skip = value if kind == "no-test" else None
        self.paths = dict(p.split("=", 1) for p in value.split()) if kind == "test-paths" else {}
        self.data_model = value if kind == "test-data" else None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def snippets(page: Path) -> List[Snippet]:
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        code = textwrap.dedent(m.group(3)) if m.group(1) else m.group(3)  # a fence in a list
        out.append(Snippet(page, m.group(2), code, line, marker.groups() if marker else ("", "")))
    return out


ALL = [s for page in PAGES for s in snippets(page)]


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cli():
    """``run(argv, input=None) -> (exit_code, output)``: the real command, in-process."""
    from typer.testing import CliRunner

    from mstream_mlx.cli.main import app

    def run(argv: List[str], input: Optional[str] = None) -> Tuple[int, str]:
        result = CliRunner().invoke(app, argv, input=input, env={"COLUMNS": "250"})
        return result.exit_code, result.output

    return run


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, cli) -> Dict[str, Path]:
    """Built on first use: ``get(name) -> path``."""
    made: Dict[str, Path] = {"bundled": BUNDLED}
    base = tmp_path_factory.mktemp("doc-fixtures")

    def get(name: str) -> Path:
        if name in made:
            return made[name]
        if name in ("adapters", "fused"):
            made["adapters"], made["fused"] = base / "adapters", base / "fused"
            data = ROOT / "examples" / "data" / "demo"
            code, out = cli(["lora", "--model", str(BUNDLED), "--data", str(data), "--train",
                             "--iters", "2", "--batch-size", "2", "--num-layers", "-1",
                             "--val-batches", "1", "--adapter-path", str(made["adapters"])])
            assert code == 0, out
            code, out = cli(["fuse", "--model", str(BUNDLED), "--adapter-path",
                             str(made["adapters"]), "--save-path", str(made["fused"])])
            assert code == 0, out
        elif name in ("tiny-rows", "tiny-blocks4"):
            from tests.tiny import make_checkpoint

            layout, n = ("rows", 10) if name == "tiny-rows" else ("blocks", 4)
            made[name] = make_checkpoint(base / name, "qwen3", layout, num_channels=n)
        elif name == "tiny-qwen3_5":
            pytest.importorskip("torch")
            from tests.reference.checkpoint import write_reference_checkpoint
            from tests.reference.torch_qwen3_5 import random_qwen3_5_state_dict
            from tests.test_qwen3_5 import tiny_config
            from tests.tiny import make_tokenizer

            cfg = tiny_config(num_channels=3)
            made[name] = base / "qwen3_5"
            write_reference_checkpoint(made[name], cfg, random_qwen3_5_state_dict(cfg, 0),
                                       architectures=["StreamQwen3_5ForCausalLM"])
            make_tokenizer(made[name])
        else:
            raise KeyError(f"unknown test-paths fixture {name!r}")
        return made[name]

    return get


# --------------------------------------------------------------------- python snippets


def _interrupt_fired(ns):
    texts = ns["session"].texts
    assert "add three" in texts["User"], texts  # the interrupt was read ...
    assert texts["Output"].split() == ["5", "3", "12", "15"], texts  # ... and answered


PROMISES = {  # (page, a line of the snippet): what the snippet promises, checked
    ("README.md", 'session.feed("User", "add three")'): _interrupt_fired,
    ("docs/generation.md", 'session.feed("User", "add three")'): _interrupt_fired,
    ("docs/generation.md", "interrupts={5:"): lambda ns: (
        ns["texts"] == {"Output": "5 3", "Thinking": "+5 -2"}, ns["texts"]),
    ("docs/generation.md", "event = events.get("): lambda ns: (
        ns["event"].text["Output"].strip() == "5", ns["event"].text),
    ("docs/generation.md", "load_prompt_cache("): lambda ns: (
        ns["cache"][0].offset == 12 and ns["last"].shape[0] == 2, ns["cache"][0].offset),
    ("docs/qwen3_5.md", "predicts row 1"): lambda ns: (
        ns["logits"].shape[:2] == (1, ns["C"]), ns["logits"].shape),
    ("docs/convert.md", 'export("stream-8b-8bit"'): lambda ns: (
        ns["model"].streams.layout == "rows" and Path("stream-8b-torch/config.json").is_file(),
        ns["model"].streams),
    ("docs/fine-tuning.md", 'load("fused_model")'): lambda ns: (
        ns["model"].streams.names == ("User", "Output", "Thinking"), ns["model"].streams),
}


def _check_promise(ns, check):
    result = check(ns)
    if isinstance(result, tuple):
        assert result[0], f"the snippet's promise does not hold: {result[1]!r}"


PYTHON_PAGES = sorted({s.page for s in ALL if s.lang == "python" and not s.skip})


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=page_id)
def test_python_snippets_run(page, fixtures, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a snippet writes land here
    for name in ("mstream_mlx", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    ns: dict = {"__name__": "__docs__"}
    rel = page_id(page)
    for s in snippets(page):
        if s.lang != "python" or s.skip:
            continue
        code = s.code
        for name, fixture in s.paths.items():
            assert f'"{name}"' in code, f"{s.where}: test-paths names {name!r}, which is unused"
            code = code.replace(f'"{name}"', repr(str(fixtures(fixture))))
        try:
            exec(compile(code, s.where, "exec"), ns)
        except Exception as e:
            raise AssertionError(f"{s.where}: the snippet fails: {type(e).__name__}: {e}") from e
        for (p, line), check in PROMISES.items():
            if p == rel and line in s.code:
                _check_promise(ns, check)


def test_every_promise_names_a_snippet():
    for page, line in PROMISES:
        assert any(page_id(s.page) == page and line in s.code for s in ALL), (page, line)


# ------------------------------------------------------------------------ JSON snippets


def _json_objects(code: str) -> list:
    try:
        return [json.loads(code)]
    except json.JSONDecodeError:
        return [json.loads(line) for line in code.splitlines() if line.strip()]


JSON = [s for s in ALL if s.lang == "json" and not s.skip]


@pytest.mark.parametrize("snippet", JSON, ids=lambda s: s.where)
def test_json_snippets_parse_and_training_lines_load(snippet, fixtures, tmp_path):
    try:
        objects = _json_objects(snippet.code)
    except json.JSONDecodeError as e:
        raise AssertionError(f"{snippet.where}: not JSON: {e}") from None
    if snippet.data_model is None:
        return
    import mstream_mlx
    from mstream_mlx.tuner.datasets import load_datasets

    model, tokenizer = mstream_mlx.load(str(fixtures(snippet.data_model)))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(o) + "\n" for o in objects))
    data = load_datasets(str(tmp_path), tokenizer, model.streams, model.args.vocab_size,
                         splits=("train",), log=lambda *a: None)
    assert len(data["train"]) == len(objects), snippet.where


# ----------------------------------------------------------------------- shell snippets


def _lines(code: str) -> List[str]:
    """The logical lines of a bash block (continuations joined, comment lines dropped)."""
    lines = code.replace("\\\n", " ").splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _commands(code: str) -> List[List[str]]:
    """The simple commands of a bash block: each line split at pipes, `&&`, `;`."""
    commands = []
    for line in _lines(code):
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split, lex.commenters = True, "#"
        current: List[str] = []
        for tok in lex:
            if set(tok) <= set("|&;"):
                commands.append(current)
                current = []
            else:
                current.append(tok)
        commands.append(current)
    return [c for c in commands if c]


def _mstream_args(command: List[str]) -> Optional[List[str]]:
    for i, tok in enumerate(command):
        if os.path.basename(tok) == "mstream-mlx":
            return command[i + 1 :]
    return None


_FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)(?![\w-])")


@pytest.fixture(scope="module")
def help_flags(cli):
    cache: Dict[str, set] = {}

    def get(sub: str) -> set:
        if sub not in cache:
            code, out = cli([sub, "--help"])
            assert code == 0, f"mstream-mlx {sub} --help failed:\n{out}"
            cache[sub] = set(_FLAG.findall(out))
        return cache[sub]

    return get


SHELL = [s for s in ALL if s.lang in ("bash", "sh", "shell")]


@pytest.mark.parametrize("snippet", SHELL, ids=lambda s: s.where)
def test_shell_snippets_use_real_flags_and_files(snippet, help_flags):
    for command in _commands(snippet.code):
        args = _mstream_args(command)
        if args is not None:
            if not args or args[0].startswith("-"):
                continue  # `mstream-mlx --help`
            sub, rest = args[0], args[1:]
            known = help_flags(sub)
            for tok in rest:
                if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", tok):
                    flag = tok.split("=", 1)[0]
                    assert flag in known, (
                        f"{snippet.where}: `mstream-mlx {sub}` has no {flag} "
                        f"(--help lists {sorted(known)})")
        elif command[0] in ("python", "python3") and len(command) > 1:
            if command[1] == "-m":
                found = importlib.util.find_spec(command[2])
                assert found is not None, f"{snippet.where}: no module {command[2]}"
            elif not command[1].startswith("-"):
                assert (ROOT / command[1]).is_file(), f"{snippet.where}: no file {command[1]}"
        elif command[0] == "bash" and len(command) > 1:
            assert (ROOT / command[1]).is_file(), f"{snippet.where}: no file {command[1]}"


NOT_OURS = {  # inline flags in the prose that belong to other tools (or say what is missing)
    "docs/distributed.md": {"--starting-port", "--python", "--verbose", "--backend", "--shard"},
    # examples/demo/build.py's own flags
    "docs/demo.md": {"--seed", "--steps", "--limit", "--no-baseline", "--install", "--out"},
}


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_flags_named_in_the_prose_exist(page, help_flags):
    known = set().union(*(help_flags(sub) for sub in COMMANDS))
    prose = FENCE.sub("", page.read_text())
    for span in re.findall(r"`([^`\n]+)`", prose):
        if span.startswith(("python ", "mlx.", "pip ")):
            continue
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", span):
            assert flag in known or flag in NOT_OURS.get(page_id(page), ()), (
                f"{page_id(page)}: `{span}` names {flag}, which no mstream-mlx command has")


def _printf_input(command: List[str]) -> str:
    return command[1].encode().decode("unicode_escape") if len(command) > 1 else ""


def _is_cheap(args: Optional[List[str]]) -> bool:
    return bool(args) and args[0] in CHEAP and "--model" not in args


@pytest.mark.parametrize("snippet", [s for s in SHELL if not s.skip and any(
    _is_cheap(_mstream_args(c)) for c in _commands(s.code))], ids=lambda s: s.where)
def test_cheap_shell_commands_run_on_the_bundled_model(snippet, cli):
    for line in _lines(snippet.code):
        commands = _commands(line)
        for i, command in enumerate(commands):
            args = _mstream_args(command)
            if not _is_cheap(args):
                continue
            feed = _printf_input(commands[i - 1]) if i and commands[i - 1][0] == "printf" else ""
            code, out = cli(args, input=feed)
            assert code == 0, (
                f"{snippet.where}: `mstream-mlx {' '.join(args)}` failed:\n{out[-2000:]}")


SHOWN = [s for s in ALL if s.lang == "" and s.code.startswith("$ mstream-mlx ")]


@pytest.mark.parametrize("snippet", SHOWN, ids=lambda s: s.where)
def test_shown_output_is_what_the_command_prints(snippet, cli):
    first, *shown = snippet.code.splitlines()
    code, out = cli(shlex.split(first)[2:])
    assert code == 0, out
    printed = {line.rstrip() for line in out.splitlines()}
    for line in shown:
        line = line.split("<-")[0].rstrip()
        if line:
            assert line in printed, (
                f"{snippet.where}: {line!r} is not in the output of `{first[2:]}`:\n{out}")


# ------------------------------------------------------------------------------- links


def _anchors(page: Path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.*)$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_stay_inside_the_repository(page):
    text = page.read_text()
    assert "../shared" not in text and "shared/reference" not in text, page
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        if target.startswith("#"):
            assert target[1:] in _anchors(page), f"{page_id(page)}: no heading {target}"
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve()
        assert path.exists(), f"{page_id(page)}: broken link {target}"
        assert ROOT in path.parents or path == ROOT, f"{page_id(page)}: {target} is outside"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{page_id(page)}: no heading #{anchor} in {file}"


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    lines = text.splitlines()
    i = lines.index("# run the tests")  # .ci/run runs the line after it
    assert lines[i + 1].startswith("pip install") and "pytest" in lines[i + 1]
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in text, f"README does not link {page.name}"
    assert "docs/chat.png" in text

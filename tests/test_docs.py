"""Every example in README.md and docs/*.md stays true.

- Every ``detkit`` command line in a ```bash block parses with the real argument parser, names only config files that
  exist, and its config with its ``key=value`` overrides loads and passes the model and eval checks.
- Every ```python block of a docs page runs (each in a fresh namespace, from the repository root, as
  tests/test_readme.py runs the README's), unless a ``<!-- no-test: reason -->`` comment precedes it.
- Relative links point to files, and to headings, that exist.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, SHARED

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOC_PAGES = [p for p in PAGES if p.parent.name == "docs"]

# a fenced block: its language, its body; fences may be indented (inside a list item)
FENCE = re.compile(r"^[ \t]*```([\w+-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.DOTALL | re.MULTILINE)
NO_TEST = re.compile(r"<!--\s*no-test:\s*([^>]*?)\s*-->\s*$")
SHELL_LANGUAGES = ("bash", "sh", "shell")
SEPARATORS = (";", "&&", "||", "|", "&")
REDIRECTS = (">", ">>", "<", "2>", "&>")

def rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def blocks(page: Path) -> list[tuple[str, str, str | None]]:
    """``(language, body, no-test reason or None)`` of every fenced block of ``page``, in order."""
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        marker = NO_TEST.search(text[:m.start()])
        out.append((m.group(1).lower(), textwrap.dedent(m.group(2)), marker.group(1) if marker else None))
    return out


# ------------------------------------------------------------------------------------------ shell commands
def logical_lines(body: str) -> list[str]:
    """Lines with backslash continuations joined."""
    lines, current = [], ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    if current:
        lines.append(current)
    return lines


def is_detkit(word: str) -> bool:
    return word == "detkit" or word.endswith("/detkit")


def commands(body: str) -> list[tuple[str, list[str]]]:
    """``(line, argv after 'detkit')`` for every detkit command of a shell block. ``# comments`` are dropped;
    ``VAR=value`` and ``time`` prefixes, and ``;``/``&&``/``&`` separators are understood; other programs (make,
    pip, ...) and usage synopses (``[--option]``, ``...`` placeholders) are skipped."""
    found = []
    for line in logical_lines(body):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as e:  # an unclosed quote
            found.append((line, ["<unparsable>", str(e)]))
            continue
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token not in SEPARATORS:
                segment.append(token)
                continue
            words = segment
            segment = []
            while words and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[0] == "time"):
                words = words[1:]
            if not words or not is_detkit(words[0]):
                continue
            words = words[1:]
            cut = next((i for i, w in enumerate(words) if w in REDIRECTS), len(words))
            words = words[:cut]
            if any(w.startswith("[") or "..." in w for w in words):
                continue  # a usage synopsis, not a command
            found.append((line.strip(), words))
    return found


def parse(argv: list[str]):
    """The parsed arguments as ``detkit.cli.main`` sees them (overrides given after options included), or an error
    message."""
    from detkit.cli import build_parser

    parser = build_parser()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit as e:
            if e.code in (0, None):  # --help, --version
                return None, ""
            return None, err.getvalue().strip().splitlines()[-1]
    strays = [e for e in extra if "=" not in e or e.startswith("-")]
    if strays or (extra and not hasattr(args, "overrides") and not hasattr(args, "args")):
        return None, f"unrecognized arguments: {' '.join(strays or extra)}"
    if extra:
        (args.overrides if isinstance(getattr(args, "overrides", None), list) else args.args).extend(extra)
    return args, ""


def is_yaml(path: str | None) -> bool:
    return bool(path) and path.lower().endswith((".yaml", ".yml"))


def config_and_overrides(args) -> tuple[str | None, list[str]]:
    """The config file a parsed command reads, if any, and its ``key=value`` overrides."""
    command = args.command
    if command == "train":  # CONFIG k=v ..., or --resume RUN k=v ... without a config
        items = list(args.args)
        if items and "=" not in items[0]:
            return items[0], items[1:]
        return None, items
    overrides = list(getattr(args, "overrides", None) or [])
    if command == "eval":  # a run directory or a config; with --predictions, --ground-truth may be a config
        target = args.ground_truth if args.predictions else args.target
        return (target if is_yaml(target) else None), overrides
    if command == "design-space":
        return args.task, overrides
    if command in ("config", "data", "transfer"):
        return getattr(args, "config", None), overrides
    return None, overrides


def missing_configs(argv: list[str]) -> list[str]:
    """Config paths under configs/ that a command names and that do not exist."""
    missing = []
    for word in argv:
        value = word.split("=", 1)[1] if "=" in word and not word.startswith("-") else word
        if is_yaml(value) and Path(value).as_posix().startswith("configs/") and not (ROOT / value).is_file():
            missing.append(value)
    return missing


def check_command(argv: list[str]) -> str:
    """'' when the command is right, else what is wrong with it."""
    from detkit.errors import DetkitError

    args, error = parse(argv)
    if error:
        return f"the parser refuses it: {error}"
    if args is None:
        return ""
    if args.command == "eval" and args.predictions and args.target:
        return (f"with --predictions, {args.target!r} is taken as the RUN_DIR|CONFIG argument, which --predictions "
                f"ignores (an override here is lost)")
    missing = missing_configs(argv)
    if missing:
        return f"no such config: {', '.join(missing)}"
    try:
        check_names(args)
        config, overrides = config_and_overrides(args)
        if config is None or not (ROOT / config).is_file():
            return ""  # no config, or one of the user's own (mydata.yaml)
        if not SHARED.exists():
            overrides = [o for o in overrides if "../shared" not in o]
        from detkit.config import load_config
        from detkit.evaluation.metrics import check_eval_config
        from detkit.models import check_model_config

        cfg = load_config(config, overrides)
        traits = check_model_config(cfg)
        check_eval_config(cfg.eval, traits, cfg.model.head.name)
    except DetkitError as e:
        return f"{type(e).__name__}: {e}"
    return ""


def check_names(args) -> None:
    """Backbone names given on the command line (``detkit backbones NAMES``, ``transfer --backbones``) exist."""
    from detkit.backbones import BACKBONES

    names = list(getattr(args, "names", None) or []) if args.command == "backbones" else []
    if args.command == "transfer":
        from detkit.analysis.lineage import expand

        names = [n.split("@")[0] for n in expand([b.strip() for b in args.backbones.split(",") if b.strip()])]
    for name in names:
        BACKBONES.entry(name.strip())


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_shell_commands(page, monkeypatch):
    monkeypatch.chdir(ROOT)
    checked, failures = 0, []
    for language, body, _ in blocks(page):
        if language not in SHELL_LANGUAGES:
            continue
        for line, argv in commands(body):
            checked += 1
            problem = check_command(argv)
            if problem:
                failures.append(f"{rel(page)}: {line}\n    -> {problem}")
    assert not failures, "\n".join(failures)
    if page.name in ("README.md", "cli.md"):
        assert checked >= 5, f"{rel(page)}: expected detkit commands in its bash blocks, found {checked}"


def test_command_splitting():
    """What counts as a command: continuations, comments, prefixes, separators; synopses and other programs not."""
    body = textwrap.dedent("""\
        make demo   # not detkit
        OMP_NUM_THREADS=1 .venv/bin/detkit train configs/yolo/shapes.yaml \\
            train.epochs=1 &   # the model's comment
        wait; detkit design-space --report runs/ds  # two commands
        detkit transfer CONFIG --backbones A,B,... [--seeds 1,2]
        time detkit backbones > table.txt
        """)
    assert [argv for _, argv in commands(body)] == [
        ["train", "configs/yolo/shapes.yaml", "train.epochs=1"],
        ["design-space", "--report", "runs/ds"],
        ["backbones"],
    ]
    assert check_command(["train", "configs/yolo/shapes.yaml", "train.epochs=1"]) == ""
    assert "no such config" in check_command(["train", "configs/yolo/nothing.yaml"])
    assert "parser refuses" in check_command(["predict", "runs/x"])  # INPUT missing
    assert "unrecognized" in check_command(["export", "runs/x", "--format", "onnx", "--out", "m.onnx", "stray"])
    assert "unknown head" in check_command(["config", "show", "configs/yolo/shapes.yaml", "model.head.name=yolov5"])
    assert "unknown config key" in check_command(["train", "configs/yolo/shapes.yaml", "train.epoch=1"])
    assert "unknown backbone" in check_command(["transfer", "configs/yolo/shapes.yaml", "--backbones", "resnet19"])
    assert check_command(["train", "--resume", "runs/x", "train.epochs=4"]) == ""  # no config to check
    assert "ignores" in check_command(["eval", "--predictions", "p.json", "--ground-truth",
                                       "configs/yolo/shapes.yaml", "model.head.name=yolo"])
    assert "unknown neck" in check_command(["design-space", "regnetx", "--task", "configs/unet/shapes.yaml",
                                            "model.neck.name=fpm"])


# ----------------------------------------------------------------------------------------- python blocks
def python_blocks() -> list:
    params = []
    for page in DOC_PAGES:
        n = 0
        for language, body, marker in blocks(page):
            if language != "python":
                continue
            n += 1
            marks = [pytest.mark.skip(reason=f"no-test: {marker}")] if marker else []
            params.append(pytest.param(page, body, id=f"{rel(page)}:{n}", marks=marks))
    return params


@pytest.mark.parametrize(("page", "block"), python_blocks())
def test_python_block_runs(page, block, monkeypatch):
    monkeypatch.chdir(ROOT)
    exec(compile(block, rel(page), "exec"), {})


# ----------------------------------------------------------------------------------------------- links
LINK = re.compile(r"\]\(([^)\s]+)\)")


def without_code(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of the headings of ``page``."""
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", page.read_text(encoding="utf-8")),
                              flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        found.add(slug)
    return found


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links(page):
    failures = []
    for target in LINK.findall(without_code(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            failures.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            failures.append(f"{target}: no heading '{anchor}' in {file.relative_to(ROOT)}")
    assert not failures, f"{rel(page)}:\n" + "\n".join(failures)


def test_index_lists_every_page():
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in DOC_PAGES:
        if page.name != "index.md":
            assert f"]({page.name})" in index, f"docs/index.md does not list {page.name}"
            assert f"](docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"


# ------------------------------------------------------------------------------------- lists of registered parts
PATH_LIST = re.compile(r"\{[^{}]*\}\.(py|yaml)")  # configs/_base_/models/{a,b}.yaml, detkit/data/{a,b}.py: files


def registered_lists() -> dict[str, tuple[list[str], list[list[str]]]]:
    """Registry -> (its names, the subsets a page may list instead: a declared trait, e.g. convert's formats)."""
    from detkit.data.formats import FORMATS, convert_sources, convert_targets
    from detkit.heads.registry import HEADS, torchvision_heads

    heads = HEADS.names()
    return {"head": (heads, [torchvision_heads(), [h for h in heads if h not in torchvision_heads()]]),
            "dataset format": (FORMATS.names(), [convert_sources(), convert_targets()])}


def stale_lists(pages=PAGES) -> list[str]:
    """Lines that name 3 or more of a registry's names without naming them all (or one of its declared subsets)."""
    bad = []
    for page in pages:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            words = set(re.findall(r"[A-Za-z0-9_]+", PATH_LIST.sub("", line)))
            for kind, (names, subsets) in registered_lists().items():
                named = {n for n in names if n in words}
                if len(named) >= 3 and named != set(names) and all(named != set(s) for s in subsets):
                    missing = ", ".join(n for n in names if n not in named)
                    where = rel(page) if page.is_relative_to(ROOT) else page.name
                    bad.append(f"{where}:{number} lists {len(named)} of the {len(names)} registered {kind}s "
                               f"(not: {missing})")
    return bad


def test_every_list_of_registered_parts_names_them_all():
    assert stale_lists() == []


def test_the_list_check_catches_a_stale_list(tmp_path):
    page = tmp_path / "stale.md"
    page.write_text("heads: faster_rcnn | mask_rcnn | ssd | yolo | unet\nfiles: `detkit/heads/{ssd,yolo,unet}.py`\n"
                    "`detkit data convert --to coco|voc|yolo`\n", encoding="utf-8")
    heads = len(registered_lists()["head"][0])
    assert [b.split(" (")[0] for b in stale_lists([page])] == [f"stale.md:1 lists 5 of the {heads} registered heads"]


# ------------------------------------------------------------------------------------- measured numbers live once
RESULT_PAGES = [ROOT / "benchmarks" / "README.md", ROOT / "docs" / "studies.md"]  # where measurements are written
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")


def quoted_elsewhere(page: Path) -> list[str]:
    """Decimal numbers of ``page`` (outside code blocks) that no results page holds: a measurement written only in
    the README would drift from the benchmark that made it."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    home = "\n".join(p.read_text(encoding="utf-8") for p in RESULT_PAGES)
    return sorted({n for n in DECIMAL.findall(text) if n not in home and n not in VERSIONS})


VERSIONS = {"2.13", "2.11", "0.26", "3.10", "3.11"}  # torch and Python versions the README names, not results


def test_every_number_the_readme_quotes_is_a_measurement_of_the_results_pages():
    assert quoted_elsewhere(ROOT / "README.md") == []

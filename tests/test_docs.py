"""The README and docs/ stay true to the repository.

A page that names a file, a module, a setting, a command or an option that does not exist
misleads the reader as surely as a wrong sentence, and nothing else would notice: the code
moves, the prose stays. So every relative link and every backticked repository path must
resolve, nothing links outside the repository, every ``CLASSLENS_*`` name is a real setting,
``docs/configuration.md`` lists exactly the fields of :class:`Settings`, every ``classlens``
command line and ``make`` target in a code span or block exists, and the README stays short.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from classlens.cli import main
from classlens.core import queue
from classlens.core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CONFIGURATION = REPO / "docs" / "configuration.md"
PAGES = [README, REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
PAGE_IDS = [str(page.relative_to(REPO)) for page in PAGES]

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
AUTOLINK = re.compile(r"<([a-z][a-z0-9+.-]*:[^>\s]+)>", re.I)
URL = re.compile(r"\b(?:https?|ftp)://", re.I)
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)
# A repository path as the pages write one: a top-level folder and what follows, or a top-level file.
TOP_FOLDERS = ("docs", "classlens", "service", "worker", "model_store", "tests", ".ci")
TOP_FILES = (
    "openapi.yaml",
    "pyproject.toml",
    "Makefile",
    "Dockerfile",
    "constraints.txt",
    "README.md",
    "CONTRIBUTING.md",
    "LICENSE",
)
REPO_PATH = re.compile(
    "^(?:(?:" + "|".join(map(re.escape, TOP_FOLDERS)) + r")/[\w./-]*|" + "|".join(map(re.escape, TOP_FILES)) + ")$"
)
MODULE = re.compile(r"^(?:classlens|service|worker|model_store)(?:\.[A-Za-z_]\w*)+")
TASK_NAMES = {queue.EXPLAIN_TASK, queue.AUDIT_TASK, queue.ANALYSIS_TASK, queue.MODEL_ADD_TASK}
SETTING_NAME = re.compile(r"\bCLASSLENS_[A-Z0-9_]*[A-Z0-9*]")
ISSUE = re.compile(r"\bissues?\s*#", re.I)
COMMAND = re.compile(r"(?:^|[\s/])classlens\s+([a-z][a-z-]*)(?:\s+([a-z][a-z-]*))?")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
MAKE = re.compile(r"(?:^|[\s;&(])make\s+([a-z][\w-]*)")


def without_code(text: str) -> str:
    return CODE_SPAN.sub("", FENCE.sub("", text))


def code_spans(text: str) -> list[str]:
    return CODE_SPAN.findall(FENCE.sub("", text))


def code_lines(text: str) -> list[str]:
    """Every command line of the page: each line of a code block (continuations joined) and each code span."""
    lines = []
    for block in FENCE.findall(text):
        body = "\n".join(block.splitlines()[1:-1])
        lines.extend(body.replace("\\\n", " ").splitlines())
    return lines + code_spans(text)


def slug(heading: str) -> str:
    """The anchor a Markdown renderer gives a heading (GitHub's rule: lower case, punctuation dropped)."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def module_exists(dotted: str) -> bool:
    """``classlens.core.store.Store``: a module of the repository, followed by any attributes."""
    parts = dotted.split(".")
    path = REPO / parts[0]
    for depth, part in enumerate(parts[1:], start=1):
        if (path / part).is_dir():
            path = path / part
        elif (path / f"{part}.py").is_file():
            return True
        else:  # a name a package defines itself; a bare top-level package name followed by a stranger is not
            init = path / "__init__.py"
            return depth > 1 and init.is_file() and re.search(rf"\b{part}\b", init.read_text()) is not None
    return True


def env_name(field: str) -> str:
    return f"CLASSLENS_{field.upper()}"


def shown_default(value: object) -> str:
    """A default as the configuration page writes it: what one would put in the environment."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_there_are_pages():
    assert README in PAGES
    assert CONFIGURATION in PAGES
    assert len(PAGES) >= 10


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_relative_link_resolves_inside_the_repository(page: Path):
    text = page.read_text(encoding="utf-8")
    prose = FENCE.sub("", text)
    wrong = []
    for target in LINK.findall(prose) + AUTOLINK.findall(prose):
        if SCHEME.match(target):
            wrong.append(f"{target}: links outside the repository")
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if file_part.startswith("/") or not resolved.is_relative_to(REPO):
            wrong.append(f"{target}: points outside the repository")
        elif not resolved.exists():
            wrong.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            wrong.append(f"{target}: no heading #{fragment} in {resolved.relative_to(REPO)}")
    if URL.search(without_code(text)):
        wrong.append("a URL in the prose (cite by name instead)")
    assert not wrong, wrong


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_backticked_repository_path_and_module_exists(page: Path):
    missing = []
    for span in code_spans(page.read_text(encoding="utf-8")):
        for token in re.split(r"[\s(]+", span):
            token = token.rstrip(":,;.)").split("::")[0]
            if REPO_PATH.match(token) and not (REPO / token).exists():
                missing.append(token)
            module = MODULE.match(token)
            if module and module.group(0) not in TASK_NAMES and not module_exists(module.group(0)):
                missing.append(module.group(0))
    assert not missing, f"{page.name} names what the repository does not have: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_no_page_cites_an_issue_number(page: Path):
    assert not ISSUE.findall(page.read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_setting_named_exists(page: Path):
    names = {env_name(field) for field in Settings.model_fields}
    unknown = set()
    for name in SETTING_NAME.findall(page.read_text(encoding="utf-8")):
        if name.endswith("*"):
            if not any(real.startswith(name[:-1]) for real in names):
                unknown.add(name)
        elif name not in names:
            unknown.add(name)
    assert not unknown, f"{page.name} names settings that do not exist: {sorted(unknown)}"


def _command_named(first: str, second: str | None) -> tuple[click.Command | None, list[str]]:
    """The command ``classlens FIRST [SECOND]`` names (SECOND is an argument unless FIRST is a group)."""
    command = main.commands.get(first)
    if isinstance(command, click.Group) and second is not None:
        return command.commands.get(second), [first, second]
    return command, [first]


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_classlens_command_and_option_exists(page: Path):
    wrong = []
    for line in code_lines(page.read_text(encoding="utf-8")):
        # The command itself: not a comment, nor what a shell runs after it or pipes it into.
        line = re.split(r"(?:^|\s)#\s|&&|;|>|\s\|\s+(?=[a-z])", line)[0]
        found = list(COMMAND.finditer(line))
        for index, here in enumerate(found):
            after = found[index + 1] if index + 1 < len(found) else None
            command, words = _command_named(here.group(1), here.group(2))
            if command is None:
                wrong.append(f"classlens {' '.join(words)}")
                continue
            if isinstance(command, click.Group):
                continue  # the group itself, as in "the `classlens models` commands"
            known = {"--help", *(opt for param in command.params for opt in (*param.opts, *param.secondary_opts))}
            rest = line[here.end() : after.start() if after else len(line)]
            wrong.extend(f"classlens {' '.join(words)} {opt}" for opt in OPTION.findall(rest) if opt not in known)
    assert not wrong, f"{page.name}: {wrong}"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_make_target_named_exists(page: Path):
    targets = set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
    named = {target for line in code_lines(page.read_text(encoding="utf-8")) for target in MAKE.findall(line)}
    assert named <= targets, f"{page.name} names make targets that do not exist: {sorted(named - targets)}"


def test_the_readme_is_short_and_names_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    # CI (.ci/run) runs exactly `make test`, the command the README gives for the tests.
    assert "make test" in text
    assert "make run" in text
    assert "make test" in (REPO / ".ci" / "run").read_text()


def _configuration_rows() -> dict[str, list[str]]:
    rows = {}
    for line in CONFIGURATION.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        field = re.fullmatch(r"`([a-z][a-z0-9_]*)`", cells[0]) if cells else None
        if field:
            assert field.group(1) not in rows, f"{field.group(1)} has two rows"
            rows[field.group(1)] = cells
    return rows


def test_the_configuration_page_has_one_row_per_setting_and_no_other():
    rows, fields = _configuration_rows(), set(Settings.model_fields)
    assert set(rows) == fields, f"missing: {sorted(fields - set(rows))}; unknown: {sorted(set(rows) - fields)}"
    for field, cells in rows.items():
        assert f"`{env_name(field)}`" in cells[1], f"{field}: the variable should be {env_name(field)}"


def test_the_configuration_page_states_the_defaults_of_the_code():
    rows = _configuration_rows()
    wrong = []
    for field, info in Settings.model_fields.items():
        if info.default_factory is not None:
            continue
        shown = shown_default(info.default)
        if f"`{shown}`" not in rows[field][2]:
            wrong.append(f"{field}: default `{shown}`, the page says {rows[field][2]!r}")
    assert not wrong, wrong
    # REDIS_URL is read with and without the prefix; the page says so.
    assert "`REDIS_URL`" in rows["redis_url"][1]

"""Every code block of the README and of docs/ runs as written, so no example goes stale.

Per Markdown file, its ```python blocks run in order in one namespace (a page reads top to
bottom), and its ```pycon blocks run as doctests in that namespace (their printed output and
exceptions are compared). Blocks that import torch run where torch is installed (CI's pinned
leg); elsewhere they are left out and the rest of the page still runs. Shell blocks are not
run (``python -m parity`` alone takes minutes): what they name — modules, scripts, constraint
files and extras — must exist. The site itself is built by CI's latest leg
(``python -m sphinx -W -b html docs ...``, ``.ci/run``).
"""

import doctest
import importlib.util
import itertools
import pathlib
import re
import shlex
import tomllib

import jax
import pytest
from cases import enable_x64

import jaxce

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGES = [p for p in PAGES if "_build" not in p.parts]
HAS_TORCH = importlib.util.find_spec("torch") is not None

# A fence at the start of a line: ```info, then the body, then a closing ``` line.
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
EXECUTED = {"python", "pycon"}
SHELL = {"bash", "console", "sh", "shell"}
# Shown, not run: plain text (output, file trees) and MyST directives (autodoc, toctree, ...).
SHOWN = {"", "text"}
PUBLIC = sorted(name for name in jaxce.__all__ if not name.startswith("_"))


def _blocks(page: pathlib.Path) -> list[tuple[str, str, int]]:
    """(info string, body, line number) of each fenced block of ``page``."""
    text = page.read_text()
    return [
        (m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1)
        for m in FENCE.finditer(text)
    ]


def _needs_torch(block: str) -> bool:
    return re.search(r"^\s*(>>> )?(import|from) .*\btorch\b", block, re.M) is not None


def _rel(page: pathlib.Path) -> str:
    return str(page.relative_to(ROOT))


def run_page(page: pathlib.Path, *, with_torch: bool) -> int:
    """Runs the page's Python blocks in order in one namespace; returns how many ran.

    Under JAX's default settings (float32, standard dtype promotion, implicit rank
    promotion), as a user runs them: the suite's float64 and strict promotion
    (``conftest.py``) are for jaxce's own tests.
    """
    namespace: dict = {"__name__": f"docs_page_{page.stem}"}
    ran = 0
    with (
        enable_x64(False),
        jax.numpy_dtype_promotion("standard"),
        jax.numpy_rank_promotion("allow"),
    ):
        for info, body, line in _blocks(page):
            if info not in EXECUTED or (_needs_torch(body) and not with_torch):
                continue
            where = f"{_rel(page)}, block at line {line}"
            if info == "python":
                # Compiled at its own lines of the page: a traceback shows the page's line.
                exec(compile("\n" * line + body, str(page), "exec"), namespace)
            else:
                test = doctest.DocTestParser().get_doctest(body, namespace, where, str(page), line)
                runner = doctest.DocTestRunner(
                    optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
                )
                runner.run(test, clear_globs=False)
                assert runner.failures == 0, f"{where}: a doctest failed (output above)"
            ran += 1
    return ran


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_page_blocks_run(page: pathlib.Path):
    run_page(page, with_torch=HAS_TORCH)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_page_fences_are_known(page: pathlib.Path):
    """A block in a language this test does not know would silently go unchecked."""
    for info, _, line in _blocks(page):
        known = info in EXECUTED | SHELL | SHOWN or info.startswith("{")
        assert known, f"{_rel(page)}:{line}: fence ```{info} is neither run nor known"


def _shell_commands(page: pathlib.Path) -> list[tuple[list[str], int]]:
    commands = []
    for info, body, line in _blocks(page):
        if info in SHELL:
            text = re.sub(r"\\\n", " ", body)  # continuation lines
            for part in re.split(r"&&|\n", text):
                part = part.split("#", 1)[0].strip()
                if part:
                    commands.append((shlex.split(part), line))
    return commands


EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
# Modules a shell block may run that an extra installs (sphinx: the docs extra), and pip.
EXTRA_MODULES = {"pip"} | {
    re.split(r"[^A-Za-z0-9_-]", req, maxsplit=1)[0].lower().replace("-", "_")
    for reqs in EXTRAS.values()
    for req in reqs
}


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_shell_blocks_name_what_exists(page: pathlib.Path):
    for words, line in _shell_commands(page):
        where = f"{_rel(page)}:{line}: {' '.join(words)}"
        for python, flag, word in zip(words, words[1:], words[2:], strict=False):
            if re.fullmatch(r"(\S*/)?python[0-9.]*", python) and flag == "-m":
                module = word.split(".")[0]
                known = (ROOT / module).is_dir() or module in EXTRA_MODULES
                assert known or importlib.util.find_spec(module), f"{where}: no module {word}"
        for before, word in itertools.pairwise(words):
            if before == "-c" and word.endswith(".txt"):
                assert (ROOT / word).is_file(), f"{where}: no constraints file {word}"
        for word in words:
            if word.endswith(".py") or word.startswith(".ci/"):
                assert (ROOT / word).is_file(), f"{where}: no file {word}"
            extras = re.fullmatch(r"\.\[(.*)\]", word)
            if extras:
                unknown = set(extras.group(1).split(",")) - set(EXTRAS)
                assert not unknown, f"{where}: no extra {unknown} in pyproject.toml"


def test_pages_run_python():
    """The collector finds the blocks (a changed fence syntax must not make this vacuous)."""
    counts = {_rel(p): sum(info == "python" for info, _, _ in _blocks(p)) for p in PAGES}
    assert counts["README.md"] >= 1
    assert sum(counts.values()) >= 20, counts


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_has_a_reference_page(name: str):
    """docs/api/<name>.md documents ``jaxce.<name>`` with autodoc and a runnable example."""
    page = ROOT / "docs" / "api" / f"{name}.md"
    assert page.is_file(), f"no reference page {_rel(page)}"
    text = page.read_text()
    assert re.search(rf"\.\. auto(function|class):: jaxce\.{name}\b", text), text[:200]
    assert any(info == "python" and f"jaxce.{name}" in body for info, body, _ in _blocks(page))
    assert "PyTorch" in text  # the equivalent, or why there is none


def test_torch_blocks_exist():
    """test_page_blocks_run runs these where torch is installed (the pinned leg)."""
    torch_blocks = [b for p in PAGES for i, b, _ in _blocks(p) if i in EXECUTED and _needs_torch(b)]
    assert torch_blocks  # the parity.compare example, the porting guide


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page: pathlib.Path):
    """Links and images to files of the repository exist (Sphinx checks docs/ itself; the
    README is read on GitHub, where a relative link to docs/*.md opens that page)."""
    text = FENCE.sub("", page.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{_rel(page)}: link to {target}, no such file"

"""The README stays a newcomer's page that reaches every docs/ page; docs/configuration.md documents every
PPOConfig field; no page names a command, link or repository path that does not exist."""

import dataclasses
import re
from pathlib import Path

from fastppo import PPOConfig

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]

README_MAX_WORDS = 1500
REPO_PREFIXES = ("fastppo/", "kernels/", "tests/", "bench/", "examples/", "scripts/", "docs/")
LINK = re.compile(r"\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCED_BLOCK = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
WILDCARDS = ("*", "?", "[", "]", "{", "}", "<", ">", "…", "...")


def _links(text: str) -> list[str]:
    """Relative link targets of a markdown page, anchors stripped (web and mail links, pure anchors left out)."""
    targets = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def _repo_paths(text: str) -> list[str]:
    """Backticked repository paths of a markdown page: inline code outside fenced blocks that starts with a
    top-level folder of the checkout and holds no spaces or wildcards (commands and globs are not paths)."""
    paths = []
    for span in CODE_SPAN.findall(FENCED_BLOCK.sub("", text)):
        span = span.strip()
        if span.startswith(REPO_PREFIXES) and not any(c.isspace() for c in span) \
                and not any(w in span for w in WILDCARDS):
            paths.append(span.split("::", 1)[0])  # a pytest node id names its file
    return paths


def test_config_table_lists_every_field():
    missing = [f.name for f in dataclasses.fields(PPOConfig) if f"| `{f.name}` |" not in CONFIGURATION]
    assert not missing, f"docs/configuration.md's config table lacks {missing}"


def test_the_two_commands_exist():
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in README and (ROOT / script).is_file()
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_config_table_rows_say_what_the_field_docstrings_say():
    """Each row's description is the field's docstring in config.py, so the two cannot drift apart."""
    import ast

    tree = ast.parse((ROOT / "fastppo" / "config.py").read_text())
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "PPOConfig").body
    rows = {line.split("|")[1].strip(" `"): line for line in CONFIGURATION.splitlines() if line.startswith("| `")}
    docs = {}
    for statement, following in zip(body, body[1:]):
        if isinstance(statement, ast.AnnAssign) and isinstance(following, ast.Expr) \
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
            docs[statement.target.id] = " ".join(following.value.value.split())
    assert set(docs) == {f.name for f in dataclasses.fields(PPOConfig)}  # every field has its docstring
    stale = [name for name, doc in docs.items() if not rows.get(name, "").rstrip().endswith(f"| {doc} |")]
    assert not stale, f"docs/configuration.md rows that differ from the docstrings in config.py: {stale}"


def test_the_readme_is_short():
    words = len(README.split())
    assert words <= README_MAX_WORDS, f"README.md has {words} words (at most {README_MAX_WORDS}): move reference to docs/"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target).resolve() for target in _links(README)}
    unlinked = [page.relative_to(ROOT).as_posix() for page in DOCS if page.resolve() not in linked]
    assert DOCS, "docs/ holds no pages"
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_links_and_repository_paths_in_the_docs_exist():
    """Every relative link resolves, and every backticked repository path exists: a moved module, test or
    benchmark leaves no stale reference behind. One message lists everything missing."""
    missing = []
    for page in PAGES:
        text = page.read_text()
        name = page.relative_to(ROOT).as_posix()
        for target in _links(text):
            if target and not (page.parent / target).exists():
                missing.append(f"{name}: link ({target})")
        for path in _repo_paths(text):
            if not (ROOT / path).exists():
                missing.append(f"{name}: path `{path}`")
    assert not missing, "missing files:\n" + "\n".join(missing)

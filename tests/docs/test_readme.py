"""The README documents every PPOConfig field and names the commands that exist."""

import dataclasses
from pathlib import Path

from fastppo import PPOConfig

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()


def test_config_table_lists_every_field():
    missing = [f.name for f in dataclasses.fields(PPOConfig) if f"| `{f.name}` |" not in README]
    assert not missing, f"README's config table lacks {missing}"


def test_the_two_commands_exist():
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in README and (ROOT / script).is_file()
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_config_table_rows_say_what_the_field_docstrings_say():
    """Each row's description is the field's docstring in config.py, so the two cannot drift apart."""
    import ast

    tree = ast.parse((ROOT / "fastppo" / "config.py").read_text())
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "PPOConfig").body
    rows = {line.split("|")[1].strip(" `"): line for line in README.splitlines() if line.startswith("| `")}
    docs = {}
    for statement, following in zip(body, body[1:]):
        if isinstance(statement, ast.AnnAssign) and isinstance(following, ast.Expr) \
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
            docs[statement.target.id] = " ".join(following.value.value.split())
    assert set(docs) == {f.name for f in dataclasses.fields(PPOConfig)}  # every field has its docstring
    stale = [name for name, doc in docs.items() if not rows.get(name, "").rstrip().endswith(f"| {doc} |")]
    assert not stale, f"README rows that differ from the docstrings in config.py: {stale}"

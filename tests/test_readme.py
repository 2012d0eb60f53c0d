"""The README documents every PPOConfig field and names the commands that exist."""

import dataclasses
from pathlib import Path

from fastppo import PPOConfig

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_config_table_lists_every_field():
    missing = [f.name for f in dataclasses.fields(PPOConfig) if f"| `{f.name}` |" not in README]
    assert not missing, f"README's config table lacks {missing}"


def test_the_two_commands_exist():
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in README and (ROOT / script).is_file()
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()

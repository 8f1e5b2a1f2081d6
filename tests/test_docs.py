"""The documentation promises stay true: every flag is in docs/cli.md, the README's commands exist."""

from __future__ import annotations

from pathlib import Path

from supervisors import docgen

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_is_current() -> None:
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert current == docgen.render(), "docs/cli.md is stale: run `python -m supervisors.docgen > docs/cli.md`"


def test_readme_shows_the_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")

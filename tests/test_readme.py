"""The README's first two commands stay true: CI runs exactly the test command it shows."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    ci_last_line = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert readme_commands()[1] == ci_last_line


def test_readme_main_command_runs_the_demo():
    assert readme_commands()[0].endswith("jaxencdec demo")

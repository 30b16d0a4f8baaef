"""The README's first two commands stay true: CI runs exactly the test command it shows."""

from __future__ import annotations

from pathlib import Path

import pytest

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


@pytest.mark.slow  # the real MiniLM pair: warm start, beam search, save, export
def test_readme_quickstart_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    snippet = text.split("## Quickstart", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md quickstart", "exec"), namespace)
    out, sequences = namespace["out"], namespace["sequences"]
    assert out.logits.shape == (2, 7, 30522) and float(out.loss) > 0
    assert sequences.shape == (2, 9)  # start token + 8 new tokens
    assert (tmp_path / "bert2bert" / "flax_model.msgpack").is_file()
    assert (tmp_path / "bert2bert-pt" / "model.safetensors").is_file()

"""The main job, end to end: the README's ``jaxencdec demo`` with its defaults, as a user runs it (~7 minutes on
2 quiet cores; its speed is stated in the README, not asserted here). It must really condition on its input:
>= 80% distinct titles over the 100 held-out abstracts and ROUGE-L above the lead baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import testing


@pytest.mark.timeout(3600)  # a guard against a hang only: on busy shared cores the demo may take far longer
def test_demo_runs_and_conditions_on_its_input(tmp_path):
    command = Path(sys.executable).with_name("jaxencdec")
    done = subprocess.run([str(command), "demo", "--output", str(tmp_path / "demo")], capture_output=True, text=True,
                          env=testing.without_fast_compile_flags(os.environ))  # compiled as a user's run is
    assert done.returncode == 0, done.stderr[-3000:]
    scores = json.loads((tmp_path / "demo" / "demo_scores.json").read_text())
    lead = next(v for k, v in scores.items() if k.startswith("lead-"))
    assert scores["distinct_titles"] >= 0.8
    assert scores["model"]["rougeL"] > lead["rougeL"], (scores["model"], lead)
    assert "ROUGE-1/2/L on 100 held-out ACLSum abstracts" in done.stdout
    for written in ("titles/final_model/flax_model.msgpack", "titles/metrics.png", "titles/metrics.jsonl"):
        assert (tmp_path / "demo" / written).is_file(), written

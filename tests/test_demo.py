"""The main job, end to end: the README's ``jaxencdec demo`` with its defaults, as a user runs it (~7 minutes on
2 cores). It must finish within 10 minutes and really condition on its input: >= 80% distinct titles over the
100 held-out abstracts and ROUGE-L above the lead baseline."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

DEMO_BUDGET_S = 600


def test_demo_runs_within_budget_and_conditions_on_its_input(tmp_path):
    command = Path(sys.executable).with_name("jaxencdec")
    started = time.perf_counter()
    done = subprocess.run([str(command), "demo", "--output", str(tmp_path / "demo")], capture_output=True,
                          text=True, timeout=DEMO_BUDGET_S + 60)
    took = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert took <= DEMO_BUDGET_S, f"the demo took {took:.0f} s"
    scores = json.loads((tmp_path / "demo" / "demo_scores.json").read_text())
    lead = next(v for k, v in scores.items() if k.startswith("lead-"))
    assert scores["distinct_titles"] >= 0.8
    assert scores["model"]["rougeL"] > lead["rougeL"], (scores["model"], lead)
    assert "ROUGE-1/2/L on 100 held-out ACLSum abstracts" in done.stdout
    for written in ("titles/final_model/flax_model.msgpack", "titles/metrics.png", "titles/metrics.jsonl"):
        assert (tmp_path / "demo" / written).is_file(), written

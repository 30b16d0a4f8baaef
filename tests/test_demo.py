"""The main job end to end: the README's ``jaxencdec demo``, as a user runs it, on a shortened schedule.

Every stage of the default run goes through the same code: the warm start from the packaged MiniLM, the copy
warm-up run and the title run of the training stack (checkpoints, export), save and reload, beam search with the
demo's decoding settings for the 100 held-out abstracts, ROUGE beside the lead baseline, and the files and report
it leaves. What the full 850 steps reach (ROUGE-L above the lead baseline, distinct titles) takes ~7 minutes on 2
cores: the README reports it, measured with the command it names, and is not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import testing

STEPS = 30  # 23 copy warm-up steps, 7 title steps


@pytest.mark.slow
def test_demo_runs_every_stage_and_reports_its_scores(tmp_path):
    command = Path(sys.executable).with_name("jaxencdec")
    done = subprocess.run([str(command), "demo", "--steps", str(STEPS), "--output", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=1800,
                          env=testing.without_fast_compile_flags(os.environ))  # compiled as a user's run is
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1/2 copy warm-up (23 steps): bert2bert warm-started from" in done.stdout
    assert "2/2 abstract -> title (7 steps) from" in done.stdout
    assert "ROUGE-1/2/L on 100 held-out ACLSum abstracts" in done.stdout
    scores = json.loads((tmp_path / "demo" / "demo_scores.json").read_text())
    lead = [name for name in scores if name.startswith("lead-")]
    assert len(lead) == 1 and set(scores[lead[0]]) >= {"rouge1", "rouge2", "rougeL"}
    assert all(0 <= scores["model"][k] <= 100 for k in ("rouge1", "rouge2", "rougeL")), scores["model"]
    assert len(scores["generated"]) == 100 and all(isinstance(t, str) for t in scores["generated"])
    assert scores["distinct_titles"] == len(set(scores["generated"])) / 100
    for written in ("warmup/final_model/flax_model.msgpack", "titles/final_model/flax_model.msgpack",
                    "titles/final_model/tokenizer.json", "titles/metrics.png", "titles/metrics.jsonl"):
        assert (tmp_path / "demo" / written).is_file(), written
    logged = [json.loads(line) for line in (tmp_path / "demo" / "titles" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in logged) == 7

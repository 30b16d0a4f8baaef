"""The main job end to end: the README's ``jaxencdec demo``, as a user runs it, on a shortened schedule.

Every stage of the default run goes through the same code: the warm start from the packaged MiniLM, the copy
warm-up run and the title run of the training stack (checkpoints, export), save and reload, beam search with the
demo's decoding settings for the 100 held-out abstracts, ROUGE beside the lead baseline, and the files and report
it leaves; ``jaxencdec generate`` on the title model writes the same titles with the decoding it carries. What the
full 850 steps reach (ROUGE-L above the lead baseline, distinct titles) takes ~7 minutes on 2 cores: the README
reports it, measured with the command it names, and is not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import testing

STEPS = 10  # 8 copy warm-up steps, 2 title steps


@pytest.mark.slow
def test_demo_runs_every_stage_and_reports_its_scores(tmp_path):
    command = Path(sys.executable).with_name("jaxencdec")
    done = subprocess.run([str(command), "demo", "--steps", str(STEPS), "--output", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=1800,
                          env=testing.without_fast_compile_flags(os.environ))  # compiled as a user's run is
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1/2 copy warm-up (8 steps): bert2bert warm-started from" in done.stdout
    assert "2/2 abstract -> title (2 steps) from" in done.stdout
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
    assert max(r.get("step", 0) for r in logged) == 2

    # The title model carries the demo's decoding (generation_config.json) and source length (its tokenizer's
    # model_max_length): `jaxencdec generate` on it writes the demo's titles, batched as the demo batches them.
    final_model = tmp_path / "demo" / "titles" / "final_model"
    saved = json.loads((final_model / "generation_config.json").read_text())
    assert {k: saved.get(k) for k in ("num_beams", "encoder_repetition_penalty", "repetition_penalty",
                                      "no_repeat_ngram_size", "min_new_tokens", "max_new_tokens")} == {
        "num_beams": 4, "encoder_repetition_penalty": 5.0, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2,
        "min_new_tokens": 3, "max_new_tokens": 24}
    assert json.loads((final_model / "tokenizer_config.json").read_text())["model_max_length"] == 64
    from jaxencdec.demo import read_papers

    texts = [paper.abstract for paper in read_papers("test")[:20]]
    cli = subprocess.run([str(command), "generate", "--model", str(final_model), "--batch-size", "20", "--jsonl",
                          *(arg for text in texts for arg in ("--text", text))], capture_output=True, text=True,
                         timeout=600, env=testing.without_fast_compile_flags(os.environ))
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert [json.loads(line)["output"] for line in cli.stdout.splitlines()] == scores["generated"][:20]

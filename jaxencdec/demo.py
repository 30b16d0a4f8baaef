"""The main job on an embedded default: warm-start bert2bert from a real pretrained BERT, fine-tune it on ACLSum
(abstract -> title) with the training stack, save, reload, and generate titles for held-out abstracts.

Data, all from the ``aclsum`` package: the 150 train+val papers' abstract -> title pairs (repeated, they are the
task), plus section text -> section heading pairs from the same papers' full-text parses (headings used by more
than two papers, like "Introduction", are dropped): a few thousand short, specific, title-like targets that
teach the fresh cross-attention to pick words from the source. The 100 test papers are never trained on.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from jaxencdec import assets

TITLE_REPEATS = 5
MAX_SOURCE_LENGTH = 64
MAX_TARGET_LENGTH = 24


@dataclass(frozen=True)
class Paper:
    id: str
    abstract: str
    title: str


def read_papers(split: str) -> list[Paper]:
    """ACLSum's ``train`` (100), ``val`` (50) or ``test`` (100) papers."""
    with open(os.path.join(assets.aclsum_path(), f"{split}.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Paper(r["id"], " ".join(r["sentences"]["abstract"]), r["title"]) for r in rows]


def heading_pairs(paper_ids: set[str]) -> list[tuple[str, str]]:
    """(section text, heading) pairs from the full-text parses of ``paper_ids``, generic headings dropped."""
    sections = []
    uses = collections.Counter()
    for path in sorted(glob.glob(os.path.join(assets.aclsum_path(), "paper_jsons", "*.json"))):
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc["paper_id"] not in paper_ids:
            continue
        texts: dict[str, list[str]] = {}
        for paragraph in doc["pdf_parse"]["body_text"]:
            texts.setdefault(paragraph["section"], []).append(paragraph["text"])
        for heading, paragraphs in texts.items():
            uses[heading.lower()] += 1
            sections.append((" ".join(paragraphs), heading))
    return [(text, heading) for text, heading in sections
            if heading and uses[heading.lower()] <= 2 and 2 <= len(heading.split()) <= 14]


def write_training_data(folder: str) -> str:
    """Writes ``train.jsonl`` (``{"source", "target"}`` per line) and returns its path."""
    papers = read_papers("train") + read_papers("val")
    pairs = [(p.abstract, p.title) for p in papers] * TITLE_REPEATS
    pairs += heading_pairs({p.id for p in papers})
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "train.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for source, target in pairs:
            f.write(json.dumps({"source": source, "target": target}) + "\n")
    return path


def run_config(pretrained: str, output_dir: str, train_file: str, steps: int) -> dict:
    """The run config the demo trains with (the same format as ``configs/*.json``)."""
    return {
        "output_dir": os.path.join(output_dir, "run"),
        "model": {"encoder": pretrained, "decoder": pretrained},
        "data": {"format": "jsonl", "train_file": train_file, "source_field": "source", "target_field": "target",
                 "max_source_length": MAX_SOURCE_LENGTH, "max_target_length": MAX_TARGET_LENGTH},
        # The cross-attention and the LM head start from scratch: they learn 7x faster than the pretrained rest.
        "optim": {"learning_rate": 3e-4, "warmup_steps": 20, "schedule": "linear", "end_lr_ratio": 0.05,
                  "weight_decay": 0.01, "label_smoothing": 0.1, "lr_multipliers": {"cross_attention|lm_head": 7.0}},
        "train": {"batch_size": 8, "num_steps": steps, "log_every": 10},
        "mesh": {"data": -1},
        "eval": {"every": -1},
        "checkpoint": {"every": 100, "keep": 1},
    }


def rouge(references: list[str], predictions: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (rouge-score, stemmed)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for r, p in zip(references, predictions)]
    return {k: float(np.mean([s[k].fmeasure for s in scores])) for k in ("rouge1", "rouge2", "rougeL")}


def run(steps: int = 300, output_dir: str = "runs/demo", pretrained: str | None = None, examples: int = 5,
        num_beams: int = 4, log: Callable[[str], None] = print) -> dict:
    """Trains, saves, reloads and evaluates; returns the scores and where everything was written."""
    from jaxencdec.modeling import EncoderDecoderModel
    from jaxencdec.tokenizer import Tokenizer
    from jaxencdec.train.config import RunConfig
    from jaxencdec.train.loop import Trainer

    started = time.perf_counter()
    pretrained = pretrained or assets.minilm_path()
    train_file = write_training_data(os.path.join(output_dir, "data"))
    log(f"warm-starting bert2bert from {pretrained}; training data: {train_file}")
    trainer = Trainer(RunConfig.from_dict(run_config(pretrained, output_dir, train_file, steps)), log=log)
    result = trainer.run()
    final_model = result["final_model"] or os.path.join(trainer.out_dir, "final_model")

    model = EncoderDecoderModel.from_pretrained(final_model)
    tokenizer = Tokenizer.from_pretrained(final_model)
    test = read_papers("test")
    generated = []
    for start in range(0, len(test), 20):
        chunk = test[start:start + 20]
        batch = tokenizer([p.abstract for p in chunk], max_length=MAX_SOURCE_LENGTH, truncation=True)
        sequences = model.generate(batch["input_ids"], batch["attention_mask"], num_beams=num_beams,
                                   max_new_tokens=MAX_TARGET_LENGTH, min_new_tokens=3, no_repeat_ngram_size=3)
        generated += tokenizer.batch_decode(np.asarray(sequences), skip_special_tokens=True)
    references = [p.title for p in test]
    lead_words = round(np.mean([len(p.title.split()) for p in read_papers("train")]))
    lead = [" ".join(p.abstract.split()[:lead_words]) for p in test]
    scores = {"model": rouge(references, generated), f"lead-{lead_words}": rouge(references, lead),
              "distinct_titles": len(set(generated)) / len(generated)}

    for paper, title in list(zip(test, generated))[:examples]:
        log(f"\nabstract:  {paper.abstract[:300]}{'...' if len(paper.abstract) > 300 else ''}\n"
            f"reference: {paper.title}\ngenerated: {title}")
    log(f"\nROUGE-1/2/L on {len(test)} held-out ACLSum abstracts (F1):")
    for name in ("model", f"lead-{lead_words}"):
        s = scores[name]
        log(f"  {name:<8} {s['rouge1']:.4f} / {s['rouge2']:.4f} / {s['rougeL']:.4f}")
    log(f"  distinct generated titles: {scores['distinct_titles']:.0%}")
    log(f"\ncheckpoints: {trainer.ckpt_dir}\nmetrics:     {os.path.join(trainer.out_dir, 'metrics.jsonl')}\n"
        f"loss plot:   {os.path.join(trainer.out_dir, 'metrics.png')}\nmodel:       {final_model}\n"
        f"took {time.perf_counter() - started:.0f} s")
    with open(os.path.join(output_dir, "demo_scores.json"), "w", encoding="utf-8") as f:
        json.dump({**scores, "generated": generated}, f, indent=2)
    return {**scores, "final_model": final_model, "generated": generated}

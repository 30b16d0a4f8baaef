"""The main job on an embedded default: warm-start bert2bert from a real pretrained BERT, fine-tune it on ACLSum
(abstract -> title) with the training stack, save, reload, and generate titles for held-out abstracts.

Two runs of the training stack, all data from the ``aclsum`` package's 150 train+val papers (the 100 test
papers are never trained on), the pretrained encoder frozen (``optim.freeze``: its backward pass is skipped,
so a step costs ~40% less and more steps fit the budget):

1. a copy warm-up on the papers' own text: a window of four sentences (abstract, introduction, conclusion)
   -> its first sentence. The fresh cross-attention and LM head learn to read the source and copy from it;
2. abstract -> title from the warm-up's export, one title pair to one copy pair, so the decoder keeps copying
   from its input instead of reciting the 150 training titles. Title targets begin with a task token (the
   tokenizer's mask token), copy targets do not; generation forces the task token first
   (``forced_bos_token_id``, as mBART selects a language), so titles come out title-shaped.

Titles are generated with beam search and transformers' ``encoder_repetition_penalty`` (favours tokens of the
abstract), ``repetition_penalty`` and ``no_repeat_ngram_size``; ``DECODING`` holds the values, chosen on the
validation split with the model trained on the train split only. The title run's config carries them as its eval
decoding, so the exported model's ``generation_config.json`` holds them and its tokenizer truncates abstracts as
training did: ``jaxencdec generate --model OUTPUT/titles/final_model`` writes the demo's titles.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from jaxencdec import assets

WARMUP_SHARE = 0.76  # of the steps: copying is slow to appear (the copy loss drops after ~350 steps)
WARMUP_LEARNING_RATE = 1e-3
TITLES_LEARNING_RATE = 3e-4
TITLE_REPEATS = 1  # title pairs per copy pair in phase 2
# Beam search settings of the demo's titles. Picked on ACLSum's validation split (a model trained on the train
# split only; ROUGE-L 27.8 there against 22.1 for the lead baseline, F1 x 100).
DECODING = dict(num_beams=4, encoder_repetition_penalty=5.0, repetition_penalty=1.3, no_repeat_ngram_size=2,
                min_new_tokens=3)
MAX_SOURCE_LENGTH = 64
MAX_TARGET_LENGTH = 24


@dataclass(frozen=True)
class Paper:
    id: str
    abstract: str
    title: str


def read_rows(split: str) -> list[dict]:
    """ACLSum's ``train`` (100), ``val`` (50) or ``test`` (100) records."""
    with open(os.path.join(assets.aclsum_path(), f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def paper_of(row: dict) -> Paper:
    return Paper(row["id"], " ".join(row["sentences"]["abstract"]), row["title"])


def read_papers(split: str) -> list[Paper]:
    return [paper_of(r) for r in read_rows(split)]


def copy_pairs(rows: list[dict]) -> list[tuple[str, str]]:
    """(four consecutive sentences, the first of them) from each paper's abstract, introduction, conclusion."""
    pairs = []
    for row in rows:
        for section in ("abstract", "introduction", "conclusion"):
            lines = row["sentences"][section]
            pairs += [(" ".join(lines[k:k + 4]), lines[k]) for k in range(0, max(1, len(lines) - 2), 2)
                      if len(lines[k].split()) >= 5]
    return pairs


def write_jsonl(path: str, pairs: list[tuple[str, str]]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for source, target in pairs:
            f.write(json.dumps({"source": source, "target": target}) + "\n")
    return path


def write_training_data(folder: str, task_token: str, seed: int = 0) -> tuple[str, str]:
    """Writes ``warmup.jsonl`` (copy pairs) and ``titles.jsonl`` (every title pair, its target prefixed by
    ``task_token``, ``TITLE_REPEATS`` times, then one copy pair per title drawn at random), ``{"source", "target"}``
    per line, and returns their paths."""
    rows = read_rows("train") + read_rows("val")
    titles = [(p.abstract, f"{task_token} {p.title}") for p in map(paper_of, rows)]
    warmup = copy_pairs(rows)
    kept = np.random.default_rng(seed).choice(len(warmup), size=min(len(titles), len(warmup)), replace=False)
    return (write_jsonl(os.path.join(folder, "warmup.jsonl"), warmup),
            write_jsonl(os.path.join(folder, "titles.jsonl"),
                        titles * TITLE_REPEATS + [warmup[i] for i in sorted(kept)]))


def title_decoding(task_token_id: int, num_beams: int) -> dict:
    """The ``eval`` section of the title run: ``DECODING`` with the task token forced first. The exported model's
    ``generation_config.json`` holds it, so that the model generates titles the demo's way by default."""
    from jaxencdec.train.config import OWN_GENERATION_KEYS

    own = {**{k: v for k, v in DECODING.items() if k in OWN_GENERATION_KEYS}, "num_beams": num_beams,
           "max_new_tokens": MAX_TARGET_LENGTH}
    rest = {k: v for k, v in DECODING.items() if k not in OWN_GENERATION_KEYS}
    return {"every": -1, **own, "generation": {**rest, "forced_bos_token_id": task_token_id}}


def run_config(model: dict, output_dir: str, train_file: str, steps: int, learning_rate: float,
               evaluation: dict | None = None) -> dict:
    """A run config of the demo (the same format as ``configs/*.json``)."""
    return {
        "output_dir": output_dir,
        "model": model,
        "data": {"format": "jsonl", "train_file": train_file, "source_field": "source", "target_field": "target",
                 "max_source_length": MAX_SOURCE_LENGTH, "max_target_length": MAX_TARGET_LENGTH},
        "optim": {"learning_rate": learning_rate, "warmup_steps": min(20, steps // 5), "schedule": "linear",
                  "end_lr_ratio": 0.05, "weight_decay": 0.01, "freeze": ["^encoder/"]},
        "train": {"batch_size": 8, "num_steps": steps, "log_every": 10},
        "mesh": {"data": -1},
        "eval": evaluation or {"every": -1},
        "checkpoint": {"every": 200, "keep": 1},
    }


def rouge(references: list[str], predictions: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 x 100 (rouge-score, stemmed): the scale of ``jaxencdec train``'s eval metrics and of
    transformers' ``run_summarization``."""
    from jaxencdec.train.metrics import text_metrics

    return text_metrics("rouge", predictions, references)


def run(steps: int = 850, output_dir: str = "runs/demo", pretrained: str | None = None, examples: int = 5,
        num_beams: int = 4, log: Callable[[str], None] = print) -> dict:
    """Trains, saves, reloads and evaluates; returns the scores and where everything was written."""
    from jaxencdec.modeling import EncoderDecoderModel
    from jaxencdec.tokenizer import Tokenizer
    from jaxencdec.train.config import RunConfig
    from jaxencdec.train.loop import Trainer

    started = time.perf_counter()
    pretrained = pretrained or assets.minilm_path()
    tokenizer = Tokenizer.from_pretrained(pretrained)
    if tokenizer.mask_token_id is None:
        raise ValueError(f"the demo marks title targets with the mask token, and {pretrained}'s tokenizer has none")
    warmup_file, titles_file = write_training_data(os.path.join(output_dir, "data"),
                                                   tokenizer.id_to_token(tokenizer.mask_token_id))
    warmup_steps = max(1, round(steps * WARMUP_SHARE))
    log(f"1/2 copy warm-up ({warmup_steps} steps): bert2bert warm-started from {pretrained}, data {warmup_file}")
    warmup = Trainer(RunConfig.from_dict(run_config({"encoder": pretrained, "decoder": pretrained},
                                                    os.path.join(output_dir, "warmup"), warmup_file,
                                                    warmup_steps, WARMUP_LEARNING_RATE)), log=log)
    warmed = warmup.run()["final_model"] or os.path.join(warmup.out_dir, "final_model")
    log(f"2/2 abstract -> title ({steps - warmup_steps} steps) from {warmed}, data {titles_file}")
    trainer = Trainer(RunConfig.from_dict(run_config({"pretrained": warmed}, os.path.join(output_dir, "titles"),
                                                     titles_file, max(1, steps - warmup_steps), TITLES_LEARNING_RATE,
                                                     title_decoding(tokenizer.mask_token_id, num_beams))), log=log)
    result = trainer.run()
    final_model = result["final_model"] or os.path.join(trainer.out_dir, "final_model")

    model = EncoderDecoderModel.from_pretrained(final_model)
    tokenizer = Tokenizer.from_pretrained(final_model)
    test = read_papers("test")
    generated = []
    for start in range(0, len(test), 20):
        chunk = test[start:start + 20]
        # the exported tokenizer truncates to MAX_SOURCE_LENGTH, and generation_config.json holds the decoding
        batch = tokenizer([p.abstract for p in chunk], truncation=True)
        sequences = model.generate(batch["input_ids"], batch["attention_mask"])
        generated += tokenizer.batch_decode(np.asarray(sequences), skip_special_tokens=True)
    references = [p.title for p in test]
    lead_words = round(np.mean([len(p.title.split()) for p in read_papers("train")]))
    lead = [" ".join(p.abstract.split()[:lead_words]) for p in test]
    scores = {"model": rouge(references, generated), f"lead-{lead_words}": rouge(references, lead),
              "distinct_titles": len(set(generated)) / len(generated)}

    for paper, title in list(zip(test, generated))[:examples]:
        log(f"\nabstract:  {paper.abstract[:300]}{'...' if len(paper.abstract) > 300 else ''}\n"
            f"reference: {paper.title}\ngenerated: {title}")
    log(f"\nROUGE-1/2/L on {len(test)} held-out ACLSum abstracts (F1 x 100):")
    for name in ("model", f"lead-{lead_words}"):
        s = scores[name]
        log(f"  {name:<8} {s['rouge1']:.2f} / {s['rouge2']:.2f} / {s['rougeL']:.2f}")
    log(f"  distinct generated titles: {scores['distinct_titles']:.0%}")
    log(f"\ncheckpoints: {trainer.ckpt_dir}\nmetrics:     {os.path.join(trainer.out_dir, 'metrics.jsonl')}\n"
        f"loss plot:   {os.path.join(trainer.out_dir, 'metrics.png')}\nmodel:       {final_model}\n"
        f"took {time.perf_counter() - started:.0f} s")
    with open(os.path.join(output_dir, "demo_scores.json"), "w", encoding="utf-8") as f:
        json.dump({**scores, "generated": generated}, f, indent=2)
    return {**scores, "final_model": final_model, "generated": generated}

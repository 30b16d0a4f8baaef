"""The transformers 4.57.3 references in ``tests/references/transformers4/``: what they were computed on, and reading
them.

transformers 5 removed relative position embeddings in BERT and RoBERTa and ``tie_encoder_decoder``, so
transformers 4 is the reference for them. ``tools/make_transformers4_references.py`` computes the references with
transformers 4 (it installs it, with the package index) and commits them; ``tests/test_relative_positions.py``
checks jaxencdec against them offline. Both take the models, inputs and settings from here, and the references
record the settings they were computed with, so a change here without a new run of the tool fails the tests
instead of comparing against other inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from hf_reference import EOS, PAD, START, batch
from jaxencdec.models.encoder_decoder import shift_tokens_right

FOLDER = Path(__file__).resolve().parent / "references" / "transformers4"
REGENERATE = "python tools/make_transformers4_references.py"

# Small enough that the committed checkpoints, gradients and outputs stay small; positions enough for every
# sequence here (sources of 11 tokens, RoBERTa's position ids starting at 2).
HIDDEN, MAX_POSITIONS = 8, 20
# name: (architecture, encoder position_embedding_type, decoder position_embedding_type, seed). Between them,
# each architecture has each relative type as encoder and as decoder.
PAIRS = {
    "bert-key-keyquery": ("bert", "relative_key", "relative_key_query", 11),
    "bert-keyquery-key": ("bert", "relative_key_query", "relative_key", 12),
    "roberta-key": ("roberta", "relative_key", "relative_key", 13),
    "roberta-keyquery": ("roberta", "relative_key_query", "relative_key_query", 14),
}
# Checks whose code does not depend on the architecture run on fewer pairs that still cover both relative types
# in both roles: the BERT pairs; the pairs with a relative_key_query decoder, and those with a relative_key one.
BERT_PAIRS = [name for name, (arch, *_) in PAIRS.items() if arch == "bert"]
KEY_QUERY_DECODERS = [name for name, (_, _, decoder, _) in PAIRS.items() if decoder == "relative_key_query"]
KEY_DECODERS = [name for name in PAIRS if name not in KEY_QUERY_DECODERS]
# A tied relative bert2bert (``tie_encoder_decoder=True``), trained by SGD.
TIED = ("bert", "relative_key_query", "relative_key_query", 21)
LEARNING_RATE, TRAIN_STEPS = 0.5, 3
GENERATE = dict(max_new_tokens=8, decoder_start_token_id=START, pad_token_id=PAD, eos_token_id=EOS)
BEAMS = dict(num_beams=4, num_return_sequences=2, length_penalty=0.6)

FORWARD = batch(seed=0)  # ids, mask, labels: sources of different lengths, labels ending in -100
GENERATION = batch(seed=3, batch_size=4, src_len=11)[:2]
TRAIN = batch(seed=6)


def decoder_inputs(labels: np.ndarray) -> np.ndarray:
    """The decoder inputs transformers builds from ``labels``."""
    return np.asarray(shift_tokens_right(jnp.asarray(labels), PAD, START))


def inputs() -> dict[str, np.ndarray]:
    """Every array the references were computed on."""
    ids, mask, labels = FORWARD
    train_ids, train_mask, train_labels = TRAIN
    return dict(ids=ids, mask=mask, labels=labels, gen_ids=GENERATION[0], gen_mask=GENERATION[1],
                train_ids=train_ids, train_mask=train_mask, train_labels=train_labels,
                train_decoder_ids=decoder_inputs(train_labels))


def settings() -> dict:
    """Everything else the references depend on, as JSON stores it."""
    return json.loads(json.dumps(dict(
        hidden=HIDDEN, max_positions=MAX_POSITIONS, pairs=PAIRS, gradients=BERT_PAIRS, use_cache=KEY_QUERY_DECODERS,
        greedy=KEY_DECODERS, tied=TIED, learning_rate=LEARNING_RATE, train_steps=TRAIN_STEPS, generate=GENERATE,
        beams=BEAMS)))


def load() -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(``metadata.json``, the recorded arrays by model then output: ``outputs["tied"]["logits"]``), after checking
    that they were computed with the settings and inputs above."""
    metadata = json.loads((FOLDER / "metadata.json").read_text())
    stale = f"the references in {FOLDER} were computed on other settings or inputs; run {REGENERATE}"
    assert metadata["settings"] == settings(), stale
    outputs: dict[str, dict[str, np.ndarray]] = {}
    with np.load(FOLDER / "outputs.npz") as data:
        for key in data.files:
            name, output = key.split("|", 1)
            outputs.setdefault(name, {})[output] = data[key]
    recorded = outputs.pop("inputs")
    assert recorded.keys() == inputs().keys() and all(
        np.array_equal(recorded[name], array) for name, array in inputs().items()), stale
    return metadata, outputs

"""Token efficiency of a run config's training batches: real tokens / token slots, unpacked (as the config pads,
with its source buckets if it has them) and packed (``data.packing``), over one epoch of the training file.

    python tools/token_efficiency.py configs/aclsum_minilm_cpu.json [--set data.max_source_length=256 ...]
    python tools/token_efficiency.py configs/aclsum_minilm_cpu.json --lengths cnn_dailymail --set ...

Loads the run's tokenizers (with its model, as training does) and reads the training file; compiles nothing.
With ``--lengths cnn_dailymail`` the pairs are instead synthetic texts with CNN/DailyMail's lengths: 2,000
article/highlights pairs whose lengths in words are drawn from log-normal distributions with the dataset's mean
and spread (articles 781 +- 390 words, highlights 56 +- 25; See et al., 2017, report means of 781 and 56
tokens), each word one token of a BERT vocabulary. Prints one line per way of batching: batches, real tokens,
slots, efficiency.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from jaxencdec.train.config import RunConfig, apply_overrides
from jaxencdec.train.data import open_pairs
from jaxencdec.train.model_bundle import build_model
from jaxencdec.train.packing import token_counts
from jaxencdec.train.pipeline import training_batches


def one_epoch(loader, num_examples: int) -> tuple[int, int, int]:
    """``(batches, real tokens, slots)`` of ``loader``'s batches until they have held ``num_examples`` examples."""
    batches = real = slots = seen = 0
    while seen < num_examples:
        batch = next(loader)
        packed = batch.get("encoder_segment_ids")
        seen += len(batch["input_ids"]) if packed is None else int(packed.max(axis=1).sum())
        tokens, cells = token_counts(batch)
        real, slots = real + tokens, slots + cells
        batches += 1
    return batches, real, slots


# words that are one token each in BERT's uncased vocabulary
WORDS = ("the", "of", "and", "to", "in", "was", "for", "on", "that", "with")


def lognormal_words(rng: np.random.Generator, mean: float, std: float, size: int) -> np.ndarray:
    """``size`` word counts (>= 1) from the log-normal distribution with this mean and standard deviation."""
    sigma2 = np.log(1 + (std / mean) ** 2)
    return np.maximum(1, rng.lognormal(np.log(mean) - sigma2 / 2, np.sqrt(sigma2), size).round()).astype(int)


def cnn_dailymail_lengths(count: int = 2000, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` (article, highlights) pairs of repeated one-token words with CNN/DailyMail's lengths."""
    rng = np.random.default_rng(seed)
    text = lambda n: " ".join(WORDS[i % len(WORDS)] for i in range(n))
    return [(text(a), text(h)) for a, h in zip(lognormal_words(rng, 781, 390, count),
                                               lognormal_words(rng, 56, 25, count))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--lengths", choices=["cnn_dailymail"],
                        help="synthetic pairs with this dataset's lengths instead of the training file")
    args = parser.parse_args()
    with open(args.config, encoding="utf-8") as f:
        config = RunConfig.from_dict(apply_overrides(json.load(f), args.set))
    data, batch = config.data, config.train.batch_size
    encoder = build_model(config).pair_encoder(data)
    pairs = open_pairs(data, "train") if args.lengths is None else cnn_dailymail_lengths()
    ways = {"unpacked" + (f", buckets {list(data.source_buckets)}" if data.source_buckets else ""):
            training_batches(pairs, encoder, batch, seed=data.seed, buckets=data.source_buckets)}
    if data.source_buckets:
        ways["unpacked, no buckets"] = training_batches(pairs, encoder, batch, seed=data.seed)
    ways["packed"] = training_batches(pairs, encoder, batch, seed=data.seed, packed=True)
    print(f"{len(pairs)} training pairs, batch {batch}, rows of {data.max_source_length} + {data.max_target_length}")
    for name, loader in ways.items():
        batches, real, slots = one_epoch(loader, len(pairs))
        print(f"{name:34s} {batches:5d} batches  {real:9,d} tokens  {slots:9,d} slots  {real / slots:6.1%}")


if __name__ == "__main__":
    main()

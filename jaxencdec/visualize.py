"""Pictures of what a model attends to. Drawing needs matplotlib (the ``train`` extra), imported only then.

Typical use, on a generated output or a reference target::

    out = model(input_ids, attention_mask, decoder_input_ids=sequences[:, :-1], output_attentions=True)
    plot_cross_attention(out.cross_attentions, source_tokens, target_tokens, "attention.png", example=0)
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def cross_attention_matrix(cross_attentions: Sequence, example: int = 0, layer: int | None = None) -> np.ndarray:
    """One example's cross-attention, float32 ``[tgt_len, src_len]``: how much each target position attends to
    each source position, averaged over the heads of decoder layer ``layer`` (None: over every layer's heads).

    Args:
      cross_attentions: ``Seq2SeqOutput.cross_attentions`` (or ``DecoderOutput.cross_attentions``): per decoder
        layer, ``[batch, heads, tgt_len, src_len]``.
      example: the row of the batch.
      layer: a decoder layer index (negative counts from the end), or None for all layers.
    """
    if not cross_attentions:
        raise ValueError("cross_attentions is empty or None: run the model with output_attentions=True")
    layers = np.stack([np.asarray(a[example], np.float32) for a in cross_attentions])  # [layers, heads, tgt, src]
    if layer is not None:
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"layer {layer} is out of range: the decoder has {len(layers)} layers")
        layers = layers[layer][None]
    return layers.mean(axis=(0, 1))


def plot_cross_attention(cross_attentions: Sequence, source_tokens: Sequence[str], target_tokens: Sequence[str],
                         path: str | os.PathLike, *, example: int = 0, layer: int | None = None,
                         title: str | None = None):
    """Writes a PNG heat map of ``cross_attention_matrix(cross_attentions, example, layer)``: source tokens along
    the x axis, target tokens along the y axis, each axis labelled with its tokens.

    The matrix is cut to ``len(target_tokens)`` rows and ``len(source_tokens)`` columns, so the padding of a
    batch can be left out by passing the example's own tokens. Returns the matplotlib ``Figure`` (not registered
    with pyplot: nothing to close).
    """
    matrix = cross_attention_matrix(cross_attentions, example, layer)
    for name, tokens, size in (("target_tokens", target_tokens, matrix.shape[0]),
                               ("source_tokens", source_tokens, matrix.shape[1])):
        if not 0 < len(tokens) <= size:
            raise ValueError(f"{name} has {len(tokens)} tokens; the attention has {size} positions on that side")
    matrix = matrix[:len(target_tokens), :len(source_tokens)]
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'jaxencdec[train]' (or pip install matplotlib)"
                          ) from e
    figure = Figure(figsize=(1.5 + 0.35 * matrix.shape[1], 1.2 + 0.3 * matrix.shape[0]))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="viridis", aspect="auto", vmin=0.0)
    axes.set_xticks(range(matrix.shape[1]), labels=list(source_tokens), rotation=90)
    axes.set_yticks(range(matrix.shape[0]), labels=list(target_tokens))
    axes.set_xlabel("source")
    axes.set_ylabel("target")
    which = "all layers" if layer is None else f"layer {layer}"
    axes.set_title(title or f"cross-attention, mean over heads of {which}")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    return figure

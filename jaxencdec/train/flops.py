"""Model FLOPs of a train step, counted from the architecture (``tools/bench_train.py``'s MFU, ``jaxencdec compile``).

A step's work is its matmuls: 2 FLOPs per multiply-add, the backward pass twice the forward pass (input and weight
gradients). 6 x parameters x tokens overstates an encoder-decoder's work (encoder weights see only source tokens,
decoder weights only target tokens, embeddings do no matmul); this counts each stack on its own tokens.
"""

from __future__ import annotations

from jaxencdec.config import EncoderDecoderConfig


def forward_flops(config: EncoderDecoderConfig, batch: int, source: int, target: int) -> float:
    """FLOPs of the forward pass's matmuls (no dropout, no cache). With B = batch, S = source, T = target length,
    per layer hidden h (encoder h_e), MLP width f, and V the decoder's vocabulary:

        encoder layer   8 B S h^2 (q, k, v, out)  +  4 B S^2 h (scores, values)  +  4 B S h f (MLP)
        decoder layer   8 B T h^2  +  4 B T^2 h          self-attention, causal but counted in full
                      + 4 B T h^2  +  4 B S h_e h        cross-attention q, out; k, v over the source
                      + 4 B T S h  +  4 B T h f          cross-attention scores, values; MLP
        LM head         2 B T e V  (+ 2 B T h e where the head has a dense transform: BERT, RoBERTa, ELECTRA)
        projection      2 B S e h_e, 2 B T e h    ELECTRA's embeddings of width e != h, projected to h

    with e the embedding width (h but for ELECTRA).

    Not counted: embeddings, layer norms, softmax, activations, the loss, the optimizer, BERT's pooler, and
    ``enc_to_dec_proj`` (encoder and decoder of different widths).
    """
    enc, dec = config.encoder_spec, config.decoder_spec
    (le, he, fe), (ld, hd, fd) = ((s.num_layers, s.hidden_size, s.intermediate_size) for s in (enc, dec))
    b, s, t = batch, source, target
    encoder = le * (8 * b * s * he**2 + 4 * b * s * s * he + 4 * b * s * he * fe)
    decoder = ld * (8 * b * t * hd**2 + 4 * b * t * t * hd + 4 * b * t * hd**2 + 4 * b * s * he * hd
                    + 4 * b * t * s * hd + 4 * b * t * hd * fd)
    ee, ed = enc.embedding_width, dec.embedding_width
    head = 2 * b * t * ed * dec.vocab_size
    if dec.lm_head_transform:
        head += 2 * b * t * hd * ed
    projections = 2 * b * s * ee * he * (ee != he) + 2 * b * t * ed * hd * (ed != hd)
    return float(encoder + decoder + head + projections)


def train_flops(config: EncoderDecoderConfig, batch: int, source: int, target: int) -> float:
    """FLOPs of one optimizer step on ``batch`` pairs: ``3 * forward_flops`` (the backward pass takes two matmuls
    per forward one). Remat's recomputation is not counted: this is the model's work, not the program's."""
    return 3 * forward_flops(config, batch, source, target)

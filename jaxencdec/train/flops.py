"""Model FLOPs of a train step, counted from the architecture (``tools/bench_train.py``'s MFU, ``jaxencdec compile``).

A step's work is its matmuls: 2 FLOPs per multiply-add, the backward pass twice the forward pass (input and weight
gradients). 6 x parameters x tokens overstates an encoder-decoder's work (encoder weights see only source tokens,
decoder weights only target tokens, embeddings do no matmul); this counts each stack on its own tokens.
"""

from __future__ import annotations

from jaxencdec.config import EncoderDecoderConfig


def forward_flops(config: EncoderDecoderConfig, batch: int, source: int, target: int) -> float:
    """FLOPs of the forward pass's matmuls (no dropout, no cache). With B = batch, S = source, T = target length,
    per layer hidden h (encoder h_e), attention width a (heads x head width: h but for Llama's ``head_dim``),
    key/value width k (a, or fewer heads' with grouped-query attention), MLP width f and m its matmuls (2, or 3
    when gated: Llama's gate, up and down), V the decoder's vocabulary:

        encoder layer   4 B S h (a + k) (q, out; k, v)  +  4 B S^2 a (scores, values)  +  2 m B S h f (MLP)
        decoder layer   4 B T h (a + k)  +  4 B T^2 a         self-attention, causal but counted in full
                      + 4 B T h a  +  4 B S h_x a             cross-attention q, out; k, v over the source
                      + 4 B T S a  +  2 m B T h f             cross-attention scores, values; MLP
        LM head         2 B T e V  (+ 2 B T h e where the head has a dense transform: BERT, RoBERTa, ELECTRA)
        projections     2 B S e h_e, 2 B T e h    ELECTRA's embeddings of width e != h, projected to h
                        2 B S h_e h               ``enc_to_dec_proj`` (encoder and decoder of different widths)

    with e the embedding width (h but for ELECTRA) and h_x the width of the states cross-attention reads (h_e, or
    h after ``enc_to_dec_proj``).

    Not counted: embeddings, norms, rotary positions, softmax, activations, the loss, the optimizer and BERT's
    pooler (its output is not part of the loss).
    """
    enc, dec = config.encoder_spec, config.decoder_spec
    b, s, t = batch, source, target

    def self_attention_and_mlp(spec, tokens: int) -> int:
        h, f = spec.hidden_size, spec.intermediate_size
        a, k = spec.num_heads * spec.head_dim, spec.kv_heads * spec.head_dim
        mlp_matmuls = 3 if spec.gated_mlp else 2
        return 4 * b * tokens * h * (a + k) + 4 * b * tokens * tokens * a + 2 * mlp_matmuls * b * tokens * h * f

    hd, he, ad = dec.hidden_size, enc.hidden_size, dec.num_heads * dec.head_dim
    encoder = enc.num_layers * self_attention_and_mlp(enc, s)
    hx = hd if config.needs_projection else he
    decoder = dec.num_layers * (self_attention_and_mlp(dec, t) + 4 * b * t * hd * ad + 4 * b * s * hx * ad
                                + 4 * b * t * s * ad)
    ee, ed = enc.embedding_width, dec.embedding_width
    head = 2 * b * t * ed * dec.vocab_size
    if dec.lm_head_transform:
        head += 2 * b * t * hd * ed
    projections = (2 * b * s * ee * he * (ee != he) + 2 * b * t * ed * hd * (ed != hd)
                   + 2 * b * s * he * hd * config.needs_projection)
    return float(encoder + decoder + head + projections)


def train_flops(config: EncoderDecoderConfig, batch: int, source: int, target: int) -> float:
    """FLOPs of one optimizer step on ``batch`` pairs: ``3 * forward_flops`` (the backward pass takes two matmuls
    per forward one). Remat's recomputation is not counted: this is the model's work, not the program's."""
    return 3 * forward_flops(config, batch, source, target)

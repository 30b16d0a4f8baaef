"""Hugging Face PyTorch reference models for equivalence tests: small random configs, saved to folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

VOCAB = 120
PAD, START, EOS = 0, 3, 2

def _roberta_shaped(config_class):
    """A small config of RoBERTa's architecture (RoBERTa, XLM-RoBERTa, CamemBERT)."""
    return lambda hidden=32, layers=2: config_class(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=EOS,
        type_vocab_size=1, layer_norm_eps=1e-5)


# model_type -> small transformers config of that architecture (hidden width and layers as arguments)
SMALL = {
    "bert": lambda hidden=32, layers=2: transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, pad_token_id=PAD),
    "roberta": _roberta_shaped(transformers.RobertaConfig),
    "xlm-roberta": _roberta_shaped(transformers.XLMRobertaConfig),
    "camembert": _roberta_shaped(transformers.CamembertConfig),
    "bert-generation": lambda hidden=32, layers=2: transformers.BertGenerationConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=START, eos_token_id=EOS),
    # embeddings narrower than the layers; the layers' activation other than the generator head's (gelu)
    "electra": lambda hidden=32, layers=2: transformers.ElectraConfig(
        vocab_size=VOCAB, embedding_size=24, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, pad_token_id=PAD, hidden_act="silu"),
    "distilbert": lambda hidden=32, layers=2: transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=hidden, n_layers=layers, n_heads=4, hidden_dim=37, max_position_embeddings=64,
        pad_token_id=PAD),
    # ``layers`` groups of two layers that share their parameters; 24-wide embeddings under the layers
    "albert": lambda hidden=32, layers=2: transformers.AlbertConfig(
        vocab_size=VOCAB, embedding_size=24, hidden_size=hidden, num_hidden_layers=2 * layers,
        num_hidden_groups=layers, num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
        pad_token_id=PAD, hidden_act="gelu_new"),
    # a global layer, then one that sees the 2 nearest tokens either side; GeGLU, rotary positions
    "modernbert": lambda hidden=32, layers=2: transformers.ModernBertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, local_attention=4, global_attn_every_n_layers=2, pad_token_id=PAD),
    "gpt2": lambda hidden=32, layers=2: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, bos_token_id=START,
        eos_token_id=EOS, pad_token_id=PAD),
    "bart": lambda hidden=32, layers=2: transformers.BartConfig(
        vocab_size=VOCAB, d_model=hidden, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=EOS, decoder_start_token_id=EOS, scale_embedding=True),
    # BART's layers under fixed sinusoidal positions, scaled embeddings, swish (as the Opus-MT models)
    "marian": lambda hidden=32, layers=2: transformers.MarianConfig(
        vocab_size=VOCAB, d_model=hidden, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
        pad_token_id=1, eos_token_id=EOS, decoder_start_token_id=EOS, scale_embedding=True,
        activation_function="swish"),
    "mbart": lambda hidden=32, layers=2: transformers.MBartConfig(
        vocab_size=VOCAB, d_model=hidden, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=EOS, decoder_start_token_id=EOS),
}


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.3) -> torch.nn.Module:
    """Re-draws every trained parameter (norms and biases too), large enough that logits are far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:  # a fixed table (Marian's sinusoidal positions): a constant, not a weight
                continue
            noise = torch.randn(p.shape, generator=generator)
            is_norm_scale = p.ndim == 1 and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm_scale else std * noise)
        for module in model.modules():  # the fixed tables, which transformers leaves at 0 in a model built from a
            if hasattr(module, "create_weight"):  # config inside another (an EncoderDecoderModel's decoder)
                module.weight.copy_(module.create_weight())
    return model.eval()


# The model pairs every equivalence test runs: name -> (encoder type, decoder type, encoder width, decoder width).
PAIRS = {
    "bert2bert": ("bert", "bert", 32, 32),
    "roberta2roberta": ("roberta", "roberta", 32, 32),
    "bert2gpt2": ("bert", "gpt2", 32, 32),
    "bert2bart": ("bert", "bart", 32, 32),
    "bert2gpt2-proj": ("bert", "gpt2", 32, 48),  # different hidden sizes: enc_to_dec_proj
    "xlmr2camembert": ("xlm-roberta", "camembert", 32, 32),  # RoBERTa's architecture under two other model types
    "distilbert2xlmr": ("distilbert", "xlm-roberta", 32, 32),
    "electra2bertgen": ("electra", "bert-generation", 32, 32),  # ELECTRA's embeddings are 24 wide: projected
    "bertgen2electra": ("bert-generation", "electra", 32, 32),
    "roberta2mbart": ("roberta", "mbart", 32, 32),  # mBART's decoder: BART's, pre-norm, with a final norm
    "albert2roberta": ("albert", "roberta", 32, 32),  # ALBERT's shared layers under 24-wide embeddings
    "electra2marian": ("electra", "marian", 32, 32),  # Marian's decoder: sinusoidal positions, no embedding norm
    "modernbert2gpt2": ("modernbert", "gpt2", 32, 32),  # rotary, GeGLU, a sliding-window layer, no norm biases
}

# Pairs that compute exactly what another pair computes, under other model types and tensor names (XLM-RoBERTa and
# CamemBERT are RoBERTa's architecture): the checks of names, files and transformers' outputs run every pair, the
# checks of our model against itself (layouts, dtypes, packing) run COMPUTED_PAIRS, where the pair repeated stands
# for the pair that repeats it.
REPEATS = {"xlmr2camembert": "roberta2roberta"}
COMPUTED_PAIRS = [name for name in PAIRS if name not in REPEATS]

# The pairs the per-pair sweeps run in the fast subset (``-m "not slow"``): BERT both sides (post-norm, tied LM-head
# transform), GPT-2 under a narrower encoder (pre-norm, enc_to_dec_proj) and BART; the full suite runs every pair.
FAST_PAIRS = ("bert2bert", "bert2gpt2-proj", "bert2bart")


def by_pair(cases: list, fast: tuple[str, ...] = FAST_PAIRS) -> list:
    """``cases`` (names, or tuples whose first item is one) as pytest parameters, those whose name is not in
    ``fast`` marked slow."""
    return [pytest.param(*(case if isinstance(case, tuple) else (case,)),
                         marks=() if (case[0] if isinstance(case, tuple) else case) in fast else pytest.mark.slow)
            for case in cases]


def hf_encoder_decoder(encoder: str, decoder: str, seed: int = 0, encoder_hidden: int = 32,
                       decoder_hidden: int = 32) -> transformers.EncoderDecoderModel:
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
        SMALL[encoder](encoder_hidden), SMALL[decoder](decoder_hidden))
    config.decoder_start_token_id = START
    config.pad_token_id = PAD
    config.eos_token_id = EOS
    torch.manual_seed(seed)
    model = transformers.EncoderDecoderModel(config=config)
    return randomize_(model, seed)


def batch(seed: int = 0, batch_size: int = 3, src_len: int = 9, tgt_len: int = 7):
    """A padded batch: sources of different lengths, labels with -100 at the end of some rows."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(4, VOCAB, (batch_size, src_len))
    attention_mask = np.ones_like(input_ids)
    for row, length in enumerate(np.linspace(src_len, src_len // 2, batch_size).astype(int)):
        attention_mask[row, length:] = 0
        input_ids[row, length:] = PAD
    labels = rng.integers(4, VOCAB, (batch_size, tgt_len))
    for row, length in enumerate(np.linspace(tgt_len, tgt_len // 2, batch_size).astype(int)):
        labels[row, length:] = -100
    return input_ids, attention_mask, labels


def torch_forward(model, input_ids, attention_mask, labels):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(input_ids, np.int64)),
                    attention_mask=torch.tensor(np.asarray(attention_mask, np.int64)),
                    labels=torch.tensor(np.asarray(labels, np.int64)))
    return out.logits.numpy(), float(out.loss)

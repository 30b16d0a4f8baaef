"""The run's model and tokenizers: ``build_model`` loads (or randomly configures) what ``config.model`` names and
returns a ``ModelBundle``; ``token_ids`` resolves the decoder-start, pad and end-of-sequence ids a run trains
with, for ``build_model`` and for ``jaxencdec compile`` alike."""

from __future__ import annotations

import os
from dataclasses import dataclass

from jaxencdec import paths
from jaxencdec.config import EncoderDecoderConfig, HFConfig
from jaxencdec.modeling import EncoderDecoderModel
from jaxencdec.tokenizer import Tokenizer
from jaxencdec.train.batches import PairEncoder
from jaxencdec.train.config import ModelSection, RunConfig, RunConfigError
from jaxencdec.train.data import DataConfig


@dataclass(frozen=True)
class ModelBundle:
    """A run's model with its tokenizers and the token ids the run uses."""

    model: EncoderDecoderModel  # params empty for a random init (they are born sharded later)
    tokenizer: Tokenizer
    decoder_tokenizer: Tokenizer
    decoder_start_token_id: int
    pad_token_id: int
    eos_token_id: int | None

    def pair_encoder(self, data: DataConfig) -> PairEncoder:
        """The run's ``PairEncoder``: these tokenizers and token ids, ``data``'s length budgets."""
        return PairEncoder(self.tokenizer, self.decoder_tokenizer, data.max_source_length, data.max_target_length,
                           self.decoder_start_token_id, self.pad_token_id, self.eos_token_id)


def token_ids(section: ModelSection, config: EncoderDecoderConfig, *, start=(), pad=(),
              eos=()) -> dict[str, int | None]:
    """``decoder_start_token_id``, ``pad_token_id`` and ``eos_token_id`` (``EncoderDecoderConfig`` field names):
    each the run config's ``model.*`` when set, else ``config``'s (its first end id when it lists several), else
    the first of ``start`` / ``pad`` / ``eos`` that is not None; None when none is set."""
    config_eos = config.eos_token_id[0] if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    candidates = {
        "decoder_start_token_id": (section.decoder_start_token_id, config.decoder_start_token_id, *start),
        "pad_token_id": (section.pad_token_id, config.pad_token_id, *pad),
        "eos_token_id": (section.eos_token_id, config_eos, *eos),
    }
    return {name: next((v for v in values if v is not None), None) for name, values in candidates.items()}


def build_model(config: RunConfig) -> ModelBundle:
    """Loads ``config.model``'s weights (or configures a random init: params left empty) and tokenizers; the
    model's config gets the run's token ids and ``model.remat`` / ``model.scan_layers``. A ``RunConfigError``
    when no decoder-start or pad id can be found."""
    m = config.model
    if m.pretrained:
        model = EncoderDecoderModel.from_pretrained(m.pretrained)
        tok_dir = m.tokenizer or m.pretrained
        dec_dir = m.decoder_tokenizer or (os.path.join(m.pretrained, "decoder_tokenizer")
                                          if paths.is_dir(os.path.join(m.pretrained, "decoder_tokenizer"))
                                          else tok_dir)
    elif m.encoder:
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(m.encoder, m.decoder)
        tok_dir = m.tokenizer or m.encoder
        dec_dir = m.decoder_tokenizer or (m.decoder if m.decoder != m.encoder and not m.tokenizer else tok_dir)
    else:
        model = EncoderDecoderModel(EncoderDecoderConfig.from_encoder_decoder_configs(
            HFConfig.from_dict(dict(m.encoder_config)), HFConfig.from_dict(dict(m.decoder_config))), params={})
        tok_dir = m.tokenizer
        dec_dir = m.decoder_tokenizer or tok_dir
    tokenizer = Tokenizer.from_pretrained(tok_dir)
    decoder_tokenizer = tokenizer if dec_dir == tok_dir else Tokenizer.from_pretrained(dec_dir)
    ids = token_ids(m, model.config,
                    start=(decoder_tokenizer.cls_token_id, decoder_tokenizer.bos_token_id),
                    pad=(decoder_tokenizer.pad_token_id, decoder_tokenizer.eos_token_id),
                    eos=(decoder_tokenizer.eos_token_id, decoder_tokenizer.sep_token_id))
    if ids["decoder_start_token_id"] is None or ids["pad_token_id"] is None:
        raise RunConfigError("set model.decoder_start_token_id and model.pad_token_id (the model config and the "
                             "tokenizer name neither)")
    model.config = model.config.replace(**ids)  # a model of its own: loaded just now
    model.configure_layers(remat=m.remat, scan_layers=m.scan_layers)
    return ModelBundle(model, tokenizer, decoder_tokenizer, **ids)

"""The one place that knows Hugging Face parameter names: per-architecture tables, ours <-> HF PyTorch.

A table is a list of :class:`Rule`: one Hugging Face tensor, the parameter path(s) of ours it holds, and how
its layout differs. HF Flax checkpoints are first renamed to PyTorch names by ``checkpoint.formats``, so one table
serves both. Our paths are ``/``-joined (``decoder/layers_0/self_attention/query/kernel``).

Layouts: PyTorch ``nn.Linear`` weights are ``[out, in]`` (ours ``[in, out]``, with attention projections
split into ``[D, heads, head_dim]`` or ``[heads, head_dim, D]``); GPT-2's ``Conv1D`` weights are already
``[in, out]`` and fuse query/key/value along ``out``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from jaxencdec.spec import TransformerSpec
from jaxencdec.models.encoder_decoder import is_tied_decoder_path
from jaxencdec.nn.layers import sinusoidal_positions

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Rule:
    """One Hugging Face tensor ``hf`` <-> our parameters ``ours`` (several when HF fuses them).

    layout: ``"same"`` (identical: embeddings, norms), ``"flat"`` (HF holds our arrays flattened and concatenated:
    biases), ``"linear"`` (PyTorch ``[out, in]``), ``"conv1d"`` (GPT-2 ``[in, out]``), ``"sinusoidal"`` (no
    parameter of ours: a fixed ``sinusoidal_positions`` table of ``shape`` that we compute; loading checks it,
    export writes it). ``n_in``: how many leading axes of our kernel are input axes (2 for attention output
    projections ``[heads, head_dim, D]``). ``aliases``: other names of the same tensor (a tied encoder-decoder's
    encoder copy): loading takes the first name present, export writes the tensor under every name.
    """

    hf: str
    ours: tuple[str, ...]
    layout: str = "same"
    n_in: int = 1
    aliases: tuple[str, ...] = ()
    shape: Shape = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every Hugging Face name of the tensor, the preferred first."""
        return (self.hf, *self.aliases)

    def hf_shape(self, our_shapes: list[Shape]) -> Shape:
        """The shape the HF tensor must have for our parameters of ``our_shapes``."""
        if self.layout == "sinusoidal":
            return self.shape
        if self.layout == "same":
            return our_shapes[0]
        if self.layout == "flat":
            return (sum(math.prod(s) for s in our_shapes),)
        n_in = math.prod(our_shapes[0][: self.n_in])
        n_out = sum(math.prod(s[self.n_in:]) for s in our_shapes)
        return (n_out, n_in) if self.layout == "linear" else (n_in, n_out)

    def to_ours(self, tensor: np.ndarray, our_shapes: list[Shape]) -> list[np.ndarray]:
        if self.layout == "sinusoidal":
            return []
        if self.layout == "same":
            return [tensor]
        if self.layout == "linear":
            tensor = tensor.T  # [in, out]
        sizes = [math.prod(s[self.n_in:]) if self.layout != "flat" else math.prod(s) for s in our_shapes]
        parts = np.split(tensor, np.cumsum(sizes)[:-1], axis=-1)
        return [p.reshape(s) for p, s in zip(parts, our_shapes)]

    def to_hf(self, arrays: list[np.ndarray]) -> np.ndarray:
        if self.layout == "sinusoidal":
            return sinusoidal_positions(*self.shape)
        if self.layout == "same":
            return arrays[0]
        if self.layout == "flat":
            return np.concatenate([a.reshape(-1) for a in arrays])
        n_in = math.prod(arrays[0].shape[: self.n_in])
        fused = np.concatenate([a.reshape(n_in, -1) for a in arrays], axis=-1)  # [in, out]
        return fused.T if self.layout == "linear" else fused


def _linear(hf: str, ours: str, n_in: int = 1, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{hf}.weight", (f"{ours}/kernel",), "linear", n_in)]
    return rules + [Rule(f"{hf}.bias", (f"{ours}/bias",), "flat")] if bias else rules


def _norm(hf: str, ours: str, bias: bool = True) -> list[Rule]:
    """A norm's scale and, unless ``bias`` is False (RMS norms, ModernBERT's layer norms), its bias."""
    rules = [Rule(f"{hf}.weight", (f"{ours}/scale",))]
    return rules + [Rule(f"{hf}.bias", (f"{ours}/bias",))] if bias else rules


def _attention(hf: str, ours: str, q: str, k: str, v: str, out: str) -> list[Rule]:
    projections = ((q, "query"), (k, "key"), (v, "value"))
    return [r for name, proj in projections for r in _linear(f"{hf}.{name}", f"{ours}/{proj}")] \
        + _linear(f"{hf}.{out}", f"{ours}/out", n_in=2)


def _conv1d(hf: str, ours: tuple[str, ...], n_in: int = 1) -> list[Rule]:
    return [Rule(f"{hf}.weight", tuple(f"{o}/kernel" for o in ours), "conv1d", n_in),
            Rule(f"{hf}.bias", tuple(f"{o}/bias" for o in ours), "flat")]


# ---- per-architecture tables: (base-model rules, LM-head rules, base prefix inside a *ForCausalLM) ----

def _bert_base(spec: TransformerSpec) -> list[Rule]:
    rules = _bert_embeddings(token_types=spec.type_vocab_size > 0)  # BertGeneration has none
    for i in range(spec.num_layers):
        hf, ours = f"encoder.layer.{i}", f"layers_{i}"
        blocks = [("attention", "self_attention")] + ([("crossattention", "cross_attention")]
                                                      if spec.add_cross_attention else [])
        for hf_block, block in blocks:
            rules += [r for name, proj in (("query", "query"), ("key", "key"), ("value", "value"))
                      for r in _linear(f"{hf}.{hf_block}.self.{name}", f"{ours}/{block}/{proj}")]
            rules += _linear(f"{hf}.{hf_block}.output.dense", f"{ours}/{block}/out", n_in=2)
            rules += _norm(f"{hf}.{hf_block}.output.LayerNorm", f"{ours}/{block}_norm")
        if spec.relative_attention:  # transformers 4's relative_key(_query): self-attention only
            rules.append(Rule(f"{hf}.attention.self.distance_embedding.weight",
                              (f"{ours}/self_attention/distance/embedding",)))
        rules += _linear(f"{hf}.intermediate.dense", f"{ours}/mlp/wi") + _linear(f"{hf}.output.dense", f"{ours}/mlp/wo")
        rules += _norm(f"{hf}.output.LayerNorm", f"{ours}/mlp_norm")
    if spec.pooler:
        rules += _linear("pooler.dense", "pooler")
    return rules


def _bert_head(spec: TransformerSpec) -> list[Rule]:
    return [*_linear("cls.predictions.transform.dense", "lm_head/transform"),
            *_norm("cls.predictions.transform.LayerNorm", "lm_head/transform_norm"),
            Rule("cls.predictions.bias", ("lm_head/bias",))] + _untied(spec, "cls.predictions.decoder")


def _roberta_head(spec: TransformerSpec) -> list[Rule]:
    return [*_linear("lm_head.dense", "lm_head/transform"), *_norm("lm_head.layer_norm", "lm_head/transform_norm"),
            Rule("lm_head.bias", ("lm_head/bias",))] + _untied(spec, "lm_head.decoder")


def _electra_base(spec: TransformerSpec) -> list[Rule]:
    """BERT's, with the projection of E-wide embeddings to D when E != D."""
    projection = _linear("embeddings_project", "embeddings_project") if spec.embedding_width != spec.hidden_size else []
    return _bert_base(spec) + projection


def _electra_head(spec: TransformerSpec) -> list[Rule]:
    return [*_linear("generator_predictions.dense", "lm_head/transform"),
            *_norm("generator_predictions.LayerNorm", "lm_head/transform_norm"),
            Rule("generator_lm_head.bias", ("lm_head/bias",))] + _untied(spec, "generator_lm_head")


def _bert_generation_head(spec: TransformerSpec) -> list[Rule]:
    """BertGenerationOnlyLMHead: one linear layer. transformers adds ``decoder.bias`` to the logits and ties
    ``bias`` to it; untied, ``bias`` is a separate tensor transformers never reads (written with the used one's
    values)."""
    if spec.tie_word_embeddings:
        return [Rule("lm_head.bias", ("lm_head/bias",))]
    return [Rule("lm_head.decoder.weight", ("lm_head/output/kernel",), "linear"),
            Rule("lm_head.decoder.bias", ("lm_head/bias",), aliases=("lm_head.bias",))]


def _untied(spec: TransformerSpec, hf: str) -> list[Rule]:
    return [] if spec.tie_word_embeddings else _linear(hf, "lm_head/output", bias=False)


def _bert_embeddings(token_types: bool) -> list[Rule]:
    """BERT-named embeddings: the word and position tables, the token-type table when there is one, the norm."""
    rules = [Rule("embeddings.word_embeddings.weight", ("embeddings/word/embedding",)),
             Rule("embeddings.position_embeddings.weight", ("embeddings/position/embedding",)),
             *_norm("embeddings.LayerNorm", "embeddings/norm")]
    if token_types:
        rules.append(Rule("embeddings.token_type_embeddings.weight", ("embeddings/token_type/embedding",)))
    return rules


def _self_attention_layer(ours: str, attention: str, projections: tuple[str, str, str, str], attention_norm: str,
                          wi: str, wo: str, mlp_norm: str) -> list[Rule]:
    """An encoder layer whose modules sit side by side (DistilBERT, ALBERT): self-attention with its output
    projection (``projections``: query, key, value, out names under ``attention``), its norm, the MLP, its norm."""
    return (_attention(attention, f"{ours}/self_attention", *projections)
            + _norm(attention_norm, f"{ours}/self_attention_norm")
            + _linear(wi, f"{ours}/mlp/wi") + _linear(wo, f"{ours}/mlp/wo") + _norm(mlp_norm, f"{ours}/mlp_norm"))


def _distilbert_base(spec: TransformerSpec) -> list[Rule]:
    rules = _bert_embeddings(token_types=False)
    for i in range(spec.num_layers):
        hf = f"transformer.layer.{i}"
        rules += _self_attention_layer(f"layers_{i}", f"{hf}.attention", ("q_lin", "k_lin", "v_lin", "out_lin"),
                                       f"{hf}.sa_layer_norm", f"{hf}.ffn.lin1", f"{hf}.ffn.lin2",
                                       f"{hf}.output_layer_norm")
    return rules


def _albert_base(spec: TransformerSpec) -> list[Rule]:
    """E-wide embeddings as BERT's, their projection, one layer per group of shared layers, the pooler."""
    rules = _bert_embeddings(token_types=True) + _linear("encoder.embedding_hidden_mapping_in", "embeddings_project")
    for g in range(spec.num_layer_params):
        hf = f"encoder.albert_layer_groups.{g}.albert_layers.0"
        rules += _self_attention_layer(f"layers_{g}", f"{hf}.attention", ("query", "key", "value", "dense"),
                                       f"{hf}.attention.LayerNorm", f"{hf}.ffn", f"{hf}.ffn_output",
                                       f"{hf}.full_layer_layer_norm")
    return rules + _linear("pooler", "pooler")


def _modernbert_base(spec: TransformerSpec) -> list[Rule]:
    """ModernBertModel: fused query/key/value (``Wqkv``) and MLP input (``Wi``: the activated half, then the
    multiplier) projections, layer norms without biases unless ``norm_bias``, no attention norm in layer 0."""
    norm = lambda hf, ours: _norm(hf, ours, bias=spec.norm_bias)
    rules = [Rule("embeddings.tok_embeddings.weight", ("embeddings/word/embedding",)),
             *norm("embeddings.norm", "embeddings/norm"), *norm("final_norm", "final_norm")]
    for i in range(spec.num_layers):
        hf, ours = f"layers.{i}", f"layers_{i}"
        attention = tuple(f"{ours}/self_attention/{p}" for p in ("query", "key", "value"))
        rules.append(Rule(f"{hf}.attn.Wqkv.weight", tuple(f"{p}/kernel" for p in attention), "linear"))
        if spec.attention_bias:
            rules.append(Rule(f"{hf}.attn.Wqkv.bias", tuple(f"{p}/bias" for p in attention), "flat"))
        rules += _linear(f"{hf}.attn.Wo", f"{ours}/self_attention/out", n_in=2, bias=spec.attention_out_bias)
        if i > 0 or spec.first_layer_attention_norm:
            rules += norm(f"{hf}.attn_norm", f"{ours}/self_attention_norm")
        mlp_in = (f"{ours}/mlp/wi_gate", f"{ours}/mlp/wi")
        rules.append(Rule(f"{hf}.mlp.Wi.weight", tuple(f"{p}/kernel" for p in mlp_in), "linear"))
        if spec.mlp_bias:
            rules.append(Rule(f"{hf}.mlp.Wi.bias", tuple(f"{p}/bias" for p in mlp_in), "flat"))
        rules += _linear(f"{hf}.mlp.Wo", f"{ours}/mlp/wo", bias=spec.mlp_bias)
        rules += norm(f"{hf}.mlp_norm", f"{ours}/mlp_norm")
    return rules


def _no_head(spec: TransformerSpec) -> list[Rule]:
    return []  # an encoder-only architecture (its config refuses the decoder role)


def _gpt2_base(spec: TransformerSpec) -> list[Rule]:
    rules = [Rule("wte.weight", ("embeddings/word/embedding",)), Rule("wpe.weight", ("embeddings/position/embedding",)),
             *_norm("ln_f", "final_norm")]
    for i in range(spec.num_layers):
        hf, ours = f"h.{i}", f"layers_{i}"
        rules += _norm(f"{hf}.ln_1", f"{ours}/self_attention_norm")
        rules += _conv1d(f"{hf}.attn.c_attn", tuple(f"{ours}/self_attention/{p}" for p in ("query", "key", "value")))
        rules += _conv1d(f"{hf}.attn.c_proj", (f"{ours}/self_attention/out",), n_in=2)
        if spec.add_cross_attention:
            rules += _norm(f"{hf}.ln_cross_attn", f"{ours}/cross_attention_norm")
            rules += _conv1d(f"{hf}.crossattention.q_attn", (f"{ours}/cross_attention/query",))
            rules += _conv1d(f"{hf}.crossattention.c_attn",
                             (f"{ours}/cross_attention/key", f"{ours}/cross_attention/value"))
            rules += _conv1d(f"{hf}.crossattention.c_proj", (f"{ours}/cross_attention/out",), n_in=2)
        rules += _norm(f"{hf}.ln_2", f"{ours}/mlp_norm")
        rules += _conv1d(f"{hf}.mlp.c_fc", (f"{ours}/mlp/wi",)) + _conv1d(f"{hf}.mlp.c_proj", (f"{ours}/mlp/wo",))
    return rules


def _lm_head(spec: TransformerSpec) -> list[Rule]:
    """A causal LM's ``lm_head`` when it is not tied to the word table (GPT-2, BART, mBART, the Llama family)."""
    return _untied(spec, "lm_head")


def _bart_base(spec: TransformerSpec) -> list[Rule]:
    rules = [Rule("embed_tokens.weight", ("embeddings/word/embedding",)),
             Rule("embed_positions.weight", ("embeddings/position/embedding",)),
             *_norm("layernorm_embedding", "embeddings/norm")]
    for i in range(spec.num_layers):
        hf, ours = f"layers.{i}", f"layers_{i}"
        blocks = [("self_attn", "self_attention")] + ([("encoder_attn", "cross_attention")]
                                                     if spec.add_cross_attention else [])
        for hf_block, block in blocks:
            rules += _attention(f"{hf}.{hf_block}", f"{ours}/{block}", "q_proj", "k_proj", "v_proj", "out_proj")
            rules += _norm(f"{hf}.{hf_block}_layer_norm", f"{ours}/{block}_norm")
        rules += _linear(f"{hf}.fc1", f"{ours}/mlp/wi") + _linear(f"{hf}.fc2", f"{ours}/mlp/wo")
        rules += _norm(f"{hf}.final_layer_norm", f"{ours}/mlp_norm")
    return rules


def _marian_base(spec: TransformerSpec) -> list[Rule]:
    """BART's layers under sinusoidal positions (computed: a ``"sinusoidal"`` rule) and no embedding norm."""
    rules = [r for r in _bart_base(spec) if not r.hf.startswith(("embed_positions.", "layernorm_embedding."))]
    return rules + [Rule("embed_positions.weight", (), "sinusoidal", shape=(spec.max_positions, spec.hidden_size))]


def _mbart_base(spec: TransformerSpec) -> list[Rule]:
    return _bart_base(spec) + _norm("layer_norm", "final_norm")  # pre-norm layers, then a final norm


def _llama_base(spec: TransformerSpec) -> list[Rule]:
    """LlamaModel (Qwen2Model, Gemma3TextModel alike): RMS norms (a scale only), q/k/v/o and gate/up/down
    projections with the biases the spec has; Gemma's query/key norms and its norms after each block; each layer's
    cross-attention block (ours: no transformers class has one) under the names transformers' pattern suggests,
    beside the LLM's tensors."""
    norm = lambda hf, ours: _norm(hf, ours, bias=False)
    rules = [Rule("embed_tokens.weight", ("embeddings/word/embedding",)), *norm("norm", "final_norm")]
    for i in range(spec.num_layers):
        hf, ours = f"layers.{i}", f"layers_{i}"
        blocks = [("self_attn", "self_attention", "input_layernorm", "post_attention_layernorm")] + (
            [("cross_attn", "cross_attention", "cross_attn_layernorm", "cross_attn_post_layernorm")]
            if spec.add_cross_attention else [])
        for hf_block, block, hf_norm, hf_post_norm in blocks:
            rules += [r for name, proj in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"))
                      for r in _linear(f"{hf}.{hf_block}.{name}", f"{ours}/{block}/{proj}", bias=spec.attention_bias)]
            rules += _linear(f"{hf}.{hf_block}.o_proj", f"{ours}/{block}/out", n_in=2, bias=spec.attention_out_bias)
            rules += norm(f"{hf}.{hf_norm}", f"{ours}/{block}_norm")
            if spec.post_sublayer_norm:
                rules += norm(f"{hf}.{hf_post_norm}", f"{ours}/{block}_post_norm")
        if spec.qk_norm:
            rules += (norm(f"{hf}.self_attn.q_norm", f"{ours}/self_attention/query_norm")
                      + norm(f"{hf}.self_attn.k_norm", f"{ours}/self_attention/key_norm"))
        if spec.add_cross_attention and spec.cross_attention_gate:
            rules.append(Rule(f"{hf}.cross_attn_gate", (f"{ours}/cross_attention_gate",)))
        rules += [r for name, proj in (("gate_proj", "wi_gate"), ("up_proj", "wi"), ("down_proj", "wo"))
                  for r in _linear(f"{hf}.mlp.{name}", f"{ours}/mlp/{proj}", bias=spec.mlp_bias)]
        if spec.post_sublayer_norm:  # Gemma: a norm before and after the MLP
            rules += (norm(f"{hf}.pre_feedforward_layernorm", f"{ours}/mlp_norm")
                      + norm(f"{hf}.post_feedforward_layernorm", f"{ours}/mlp_post_norm"))
        else:
            rules += norm(f"{hf}.post_attention_layernorm", f"{ours}/mlp_norm")
    return rules


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face architecture names its tensors.

    ``encoder_prefixes`` / ``decoder_prefixes``: where the base model may sit in a standalone checkpoint used as
    an encoder / a decoder; the first is what transformers' ``EncoderDecoderModel`` uses (``AutoModel`` for the
    encoder, ``*ForCausalLM`` for the decoder). ``word_embedding_aliases``: names of a shared word table that
    stands in for the stack's own (BART's ``shared``).
    """

    base: Callable[[TransformerSpec], list[Rule]]
    head: Callable[[TransformerSpec], list[Rule]]
    encoder_prefixes: tuple[str, ...]
    decoder_prefixes: tuple[str, ...]
    word_embedding_aliases: tuple[str, ...] = ()


_ROBERTA = Architecture(_bert_base, _roberta_head, ("", "roberta."), ("roberta.", ""))

ARCHITECTURES: Mapping[str, Architecture] = {
    "bert": Architecture(_bert_base, _bert_head, ("", "bert."), ("bert.", "")),
    "roberta": _ROBERTA,
    # RoBERTa's modules under other model types: XLMRobertaForCausalLM and CamembertForCausalLM name them alike
    "xlm-roberta": _ROBERTA,
    "camembert": _ROBERTA,
    "bert-generation": Architecture(_bert_base, _bert_generation_head, ("", "bert."), ("bert.", "")),
    "electra": Architecture(_electra_base, _electra_head, ("", "electra."), ("electra.", "")),
    "distilbert": Architecture(_distilbert_base, _no_head, ("", "distilbert."), ("distilbert.",)),
    "albert": Architecture(_albert_base, _no_head, ("", "albert."), ("albert.",)),
    "modernbert": Architecture(_modernbert_base, _no_head, ("", "model."), ("model.",)),
    "gpt2": Architecture(_gpt2_base, _lm_head, ("", "transformer."), ("transformer.", "")),
    "bart": Architecture(_bart_base, _lm_head, ("encoder.", "model.encoder."), ("model.decoder.", "decoder."),
                         ("shared.weight", "model.shared.weight")),
    "mbart": Architecture(_mbart_base, _lm_head, ("encoder.", "model.encoder."), ("model.decoder.", "decoder."),
                          ("shared.weight", "model.shared.weight")),
    "marian": Architecture(_marian_base, _lm_head, ("encoder.", "model.encoder."), ("model.decoder.", "decoder."),
                           ("shared.weight", "model.shared.weight")),
    # LlamaForCausalLM, Qwen2ForCausalLM, Gemma3ForCausalLM: decoders only (their configs refuse the encoder role)
    **dict.fromkeys(("llama", "qwen2", "gemma3_text"),
                    Architecture(_llama_base, _lm_head, ("model.",), ("model.", ""))),
}

# Non-persistent buffers and derived tensors some checkpoints carry; never weights, never reported.
IGNORED_SUFFIXES = ("position_ids", "token_type_ids", "attn.bias", "attn.masked_bias", "predictions.decoder.bias",
                    "lm_head.decoder.bias")


def _prefixed(rules: list[Rule], hf_prefix: str, our_prefix: str) -> list[Rule]:
    """``rules`` with ``hf_prefix`` before the HF names and ``our_prefix/`` before ours (none when empty)."""
    ours = (lambda o: f"{our_prefix}/{o}") if our_prefix else (lambda o: o)
    return [dataclasses.replace(r, hf=hf_prefix + r.hf, ours=tuple(map(ours, r.ours)),
                                aliases=tuple(hf_prefix + a for a in r.aliases)) for r in rules]


def _to_encoder(path: str) -> str:
    """A decoder parameter path -> the encoder's path it reads under tie_encoder_decoder (itself if not tied)."""
    inside = path.removeprefix("decoder/")
    return f"encoder/{inside}" if inside != path and is_tied_decoder_path(inside) else path


def stack_rules(model_type: str, spec: TransformerSpec, role: str, hf_prefix: str, our_prefix: str,
                tied: bool = False) -> list[Rule]:
    """Rules for one stack: an encoder as HF's ``AutoModel`` names it, or a decoder as ``*ForCausalLM`` does.

    ``tied`` (a decoder of a ``tie_encoder_decoder`` model, ``our_prefix`` "decoder"): the decoder tensors that
    transformers ties to the encoder's fill the encoder's parameters, which the decoder reads.
    """
    arch = ARCHITECTURES[model_type]
    prefixes = arch.encoder_prefixes if role == "encoder" else arch.decoder_prefixes
    rules = _prefixed(arch.base(spec), hf_prefix + prefixes[0], our_prefix)
    if role == "encoder":
        # transformers' AutoModel of BART or mBART is the whole model: its word table is its `shared` tensor, the
        # one copy transformers 5 saves of the tied tables
        word, shared = hf_prefix + prefixes[0] + _WORD_EMBEDDING[model_type], arch.word_embedding_aliases[:1]
        return [dataclasses.replace(r, aliases=r.aliases + tuple(hf_prefix + a for a in shared)) if r.hf == word
                else r for r in rules]
    rules += _prefixed(arch.head(spec), hf_prefix, our_prefix)
    return [dataclasses.replace(r, ours=tuple(map(_to_encoder, r.ours))) for r in rules] if tied else rules


def _merge_tied(encoder_rules: list[Rule], decoder_rules: list[Rule]) -> list[Rule]:
    """One rule per tied tensor: the decoder's name first (transformers 4 kept the decoder's copy when it saved
    a tied model, and its copy won when a checkpoint held two), the encoder's as an alias."""
    decoder_names = {r.ours: r.hf for r in decoder_rules}
    encoder_side = [dataclasses.replace(r, hf=decoder_names[r.ours], aliases=(r.hf,)) if r.ours in decoder_names
                    else r for r in encoder_rules]
    return encoder_side + [r for r in decoder_rules if not r.ours[0].startswith("encoder/")]


def encoder_decoder_rules(config) -> list[Rule]:
    """Rules for a Hugging Face ``EncoderDecoderModel`` state dict (``encoder.*``, ``decoder.*``, projection).

    With ``tie_encoder_decoder`` each tied tensor is one parameter of ours under two names (``Rule.aliases``).
    """
    rules = stack_rules(config.encoder.model_type, config.encoder_spec, "encoder", "encoder.", "encoder")
    decoder = stack_rules(config.decoder.model_type, config.decoder_spec, "decoder", "decoder.", "decoder",
                          tied=config.tie_encoder_decoder)
    rules = _merge_tied(rules, decoder) if config.tie_encoder_decoder else rules + decoder
    if config.needs_projection:
        rules += _linear("enc_to_dec_proj", "enc_to_dec_proj")
    return rules


def alternative_names(model_type: str, role: str, hf_name: str) -> list[str]:
    """Other names a standalone checkpoint may use for ``hf_name``: the base model under another prefix (or
    none), or a shared word table."""
    arch = ARCHITECTURES[model_type]
    prefixes = arch.encoder_prefixes if role == "encoder" else arch.decoder_prefixes
    if not hf_name.startswith(prefixes[0]):
        return []  # an LM-head tensor: it has one name
    rest = hf_name[len(prefixes[0]):]
    aliases = [p + rest for p in prefixes[1:]]
    if rest == _WORD_EMBEDDING[model_type]:
        aliases += list(arch.word_embedding_aliases)
    return aliases


_WORD_EMBEDDING = {**dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "bert-generation", "electra",
                                    "distilbert", "albert"), "embeddings.word_embeddings.weight"),
                   "modernbert": "embeddings.tok_embeddings.weight",
                   "gpt2": "wte.weight",
                   **dict.fromkeys(("bart", "mbart", "marian", "llama", "qwen2", "gemma3_text"), "embed_tokens.weight")}

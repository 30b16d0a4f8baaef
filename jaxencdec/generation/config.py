"""GenerationConfig: transformers' field names and defaults, read from and written to generation_config.json."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from jaxencdec import fields, paths, storage
from jaxencdec.checkpoint.hub import resolve_model_folder

logger = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"

# transformers 5: with neither max_length nor max_new_tokens set anywhere, generate 20 new tokens.
DEFAULT_MAX_NEW_TOKENS = 20
TRANSFORMERS_DEFAULT_MAX_LENGTH = 20  # GenerationConfig().max_length in transformers; unset (None) here

# transformers generation options that change what is generated and that jaxencdec does not implement, each with
# the values at which transformers leaves generation unchanged. Set to anything else (in generation_config.json
# or as a keyword), they are an error at generate time rather than silently ignored.
NOT_IMPLEMENTED = {
    "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "min_p": (None,),
    "top_h": (None,), "diversity_penalty": (None, 0.0), "num_beam_groups": (None, 1), "penalty_alpha": (None,),
    "dola_layers": (None,), "guidance_scale": (None, 1.0), "sequence_bias": (None, {}),
    "suppress_tokens": (None, []), "begin_suppress_tokens": (None, []), "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False), "constraints": (None, []), "force_words_ids": (None, []),
    "watermarking_config": (None,), "stop_strings": (None, []), "max_time": (None,), "token_healing": (None, False),
    # What generate returns besides the ids: accepted at the values that return only ids. use_cache is neutral at
    # any value: decoding with the KV cache gives the ids decoding without it would.
    "use_cache": (None, True, False), "output_logits": (None, False),
}


class GenerationConfigError(ValueError):
    """A generation setting is out of range or inconsistent."""


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    """Logs ``message`` the first time only (transformers' ``warning_once``): every derived config re-validates."""
    logger.warning(message)


@fields.assigned_through_replace("model.generation_config")
@dataclass(frozen=True)
class GenerationConfig:
    """How to generate; every field means what it means in transformers' ``GenerationConfig``.

    Lengths count the decoder start token, as transformers does for encoder-decoders: ``max_length`` is the total
    length of the returned sequences. ``max_new_tokens`` wins over ``max_length`` when both are set; with neither,
    20 new tokens are generated (transformers 5). ``min_new_tokens`` likewise wins over ``min_length``.
    ``eos_token_id`` may be an int or a tuple of ints; ``bad_words_ids`` a tuple of token-id tuples.
    ``early_stopping`` is True, False or ``"never"``.

    The config is frozen and hashable: it is a static argument of the jitted generate function, so every field
    (lengths, beams, penalties, token ids) is compiled in. ``resolve()`` gives the normalised form the search uses.
    """

    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    do_sample: bool = False
    num_beams: int = 1
    num_return_sequences: int = 1
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0
    encoder_no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    encoder_repetition_penalty: float = 1.0
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | tuple[int, ...] | None = None
    remove_invalid_values: bool | None = None  # None: unset, as False
    decoder_start_token_id: int | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    output_scores: bool = False
    output_attentions: bool = False
    output_hidden_states: bool = False
    return_dict_in_generate: bool = False
    # Keys of generation_config.json this class does not model, kept for the way back.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        # None means unset, as in transformers 5 (GenerationConfig(temperature=None), null in a JSON file): a field
        # with a default keeps it.
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and f.default is not None and f.default is not dataclasses.MISSING:
                object.__setattr__(self, f.name, f.default)
        for name in ("eos_token_id", "bad_words_ids", "forced_eos_token_id"):
            object.__setattr__(self, name, fields.frozen(getattr(self, name)))  # hashable: a static jit argument
        self.validate()

    def validate(self, strict: bool = False) -> None:
        """Checks the settings as transformers' ``GenerationConfig.validate`` and its logits warpers do.

        Raises GenerationConfigError, naming the field, for a value transformers refuses or that makes no sense
        (when sampling: ``temperature`` not > 0 or NaN, ``top_k`` < 0, ``top_p`` outside (0, 1]; a non-finite
        ``length_penalty``; a negative length or token id...). Settings transformers accepts but ignores in the
        chosen mode (``ignored_settings``) are logged once as a warning; ``strict=True`` raises for them too, as
        ``save_pretrained`` does.
        """
        self._check_values()
        ignored = self.ignored_settings()
        if not ignored:
            return
        message = ("these generation settings do not apply in the chosen mode and are ignored: "
                   + "; ".join(ignored.values()))
        if strict:
            raise GenerationConfigError(message)
        _warn_once(message)

    def ignored_settings(self) -> dict[str, str]:
        """``{field: why}`` for the settings transformers flags as minor issues: sampling options without
        ``do_sample``, beam options with ``num_beams=1``, ``output_scores`` / ``output_attentions`` /
        ``output_hidden_states`` without ``return_dict_in_generate``."""
        ignored = {}
        if not self.do_sample:
            for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 50)):
                value = getattr(self, name)
                if value != default:
                    ignored[name] = f"{name}={value!r} only applies when sampling; set do_sample=True or unset it"
        if self.num_beams == 1:
            for name, default in (("early_stopping", False), ("length_penalty", 1.0)):
                value = getattr(self, name)
                if value != default:
                    ignored[name] = f"{name}={value!r} only applies to beam search; set num_beams > 1 or unset it"
        for name in ("output_scores", "output_attentions", "output_hidden_states"):
            if getattr(self, name) and not self.return_dict_in_generate:
                ignored[name] = (f"{name}=True only applies with return_dict_in_generate=True (generate then "
                                 f"returns a GenerateOutput); set it or unset {name}")
        return ignored

    def _check_values(self) -> None:
        """Raises GenerationConfigError for a value of the wrong type, one transformers would reject, or one that
        makes no sense."""
        def check(ok, message):
            if not ok:
                raise GenerationConfigError(message)

        fields.check_types(self, GenerationConfigError)
        check(self.max_new_tokens is None or self.max_new_tokens > 0,
              f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        check(self.max_length is None or self.max_length > 1,
              f"max_length counts the decoder start token and must be an integer > 1, got {self.max_length!r}")
        check(self.min_length >= 0, f"min_length must be an integer >= 0, got {self.min_length!r}")
        check(self.min_new_tokens is None or self.min_new_tokens >= 0,
              f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        check(self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams!r}")
        check(self.num_return_sequences >= 1, f"num_return_sequences must be >= 1, got {self.num_return_sequences!r}")
        if self.num_beams > 1:
            check(self.num_return_sequences <= self.num_beams,
                  f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")
        else:
            check(self.num_return_sequences == 1 or self.do_sample,
                  f"greedy search returns one sequence per input; num_return_sequences={self.num_return_sequences} "
                  "needs num_beams >= num_return_sequences or do_sample=True")
        check(isinstance(self.early_stopping, bool) or self.early_stopping == "never",
              f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        for name in ("repetition_penalty", "encoder_repetition_penalty"):
            value = getattr(self, name)
            check(value > 0, f"{name} must be > 0, got {value!r}")
        for name in ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size"):
            value = getattr(self, name)
            check(value >= 0, f"{name} must be an integer >= 0, got {value!r}")
        check(math.isfinite(self.length_penalty),
              f"length_penalty must be a finite number (the exponent of the length in beam scores), got "
              f"{self.length_penalty!r}")
        if self.do_sample:
            check(self.temperature > 0,
                  f"temperature must be > 0 when sampling (for greedy decoding set do_sample=False), "
                  f"got {self.temperature!r}")
            check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
            check(self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.bad_words_ids is not None:
            check(len(self.bad_words_ids) > 0
                  and all(len(words) > 0 and all(t >= 0 for t in words) for words in self.bad_words_ids),
                  f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got {self.bad_words_ids!r}")
        for name in ("eos_token_id", "forced_eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, tuple) else () if value is None else (value,)
            check(all(t >= 0 for t in ids), f"{name} must be token id(s) >= 0, got {value!r}")
        for name in ("decoder_start_token_id", "bos_token_id", "pad_token_id", "forced_bos_token_id"):
            value = getattr(self, name)
            check(value is None or value >= 0, f"{name} must be a token id >= 0, got {value!r}")

    def replace(self, **changes) -> "GenerationConfig":
        """A copy with ``changes``; an unknown option is a GenerationConfigError naming its closest options.
        transformers options this library does not implement are kept in ``extra``: ``resolve`` refuses them unless
        they are neutral."""
        names = sorted(f.name for f in dataclasses.fields(self) if f.name != "extra")
        unknown = fields.unknown_names(sorted(changes), [*names, *NOT_IMPLEMENTED])
        if unknown:
            raise GenerationConfigError(f"unknown generation option(s) {', '.join(unknown)}; known options: "
                                        f"{', '.join(names)}")
        return fields.replace(self, changes, NOT_IMPLEMENTED)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def fill_unset_from(self, defaults: "GenerationConfig") -> "GenerationConfig":
        """Fields left ``None`` here take ``defaults``' value (transformers merges a user's config with the model's
        ``generation_config`` this way: token ids and lengths the user did not set come from the model)."""
        changes = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(self)
                   if f.name != "extra" and getattr(self, f.name) is None and getattr(defaults, f.name) is not None}
        return dataclasses.replace(self, **changes) if changes else self

    def resolve(self) -> "GenerationConfig":
        """The normalised config the search runs on, with transformers' derivations done once:

        * ``max_length``: total length (start token included): ``1 + max_new_tokens``, else ``max_length``, else
          ``1 + 20``; ``max_new_tokens = max_length - 1``.
        * ``min_length``: ``1 + min_new_tokens`` when that is set (``min_new_tokens`` then cleared).
        * ``decoder_start_token_id``: falls back to ``bos_token_id``; missing both is an error.
        * ``pad_token_id``: falls back to the first eos id. ``eos_token_id``: a tuple (possibly empty).

        Idempotent: ``c.resolve().resolve() == c.resolve()``. Raises ``GenerationConfigError`` for a transformers
        option this library does not implement that is set to a value that would change the result.
        """
        active = {k: v for k, v in self.extra.items() if k in NOT_IMPLEMENTED and v not in NOT_IMPLEMENTED[k]}
        if active:
            raise GenerationConfigError(
                "jaxencdec does not implement these generation options, which transformers would apply: "
                + ", ".join(f"{k}={v!r}" for k, v in sorted(active.items()))
                + " (remove them from generation_config.json or pass their neutral values)")
        if self.max_new_tokens is not None:
            max_length = 1 + self.max_new_tokens
        elif self.max_length is not None:
            max_length = self.max_length
        else:
            max_length = 1 + DEFAULT_MAX_NEW_TOKENS
        min_length = 1 + self.min_new_tokens if self.min_new_tokens is not None else self.min_length
        start = self.decoder_start_token_id if self.decoder_start_token_id is not None else self.bos_token_id
        if start is None:
            raise GenerationConfigError(
                "decoder_start_token_id (or bos_token_id) must be set for encoder-decoder generation: pass "
                "decoder_start_token_id=... or set it in the model config / generation config")
        eos = self.eos_token_ids
        pad = self.pad_token_id if self.pad_token_id is not None else (eos[0] if eos else None)
        return dataclasses.replace(
            self, max_length=max_length, max_new_tokens=max_length - 1, min_length=min_length, min_new_tokens=None,
            decoder_start_token_id=start, pad_token_id=pad, eos_token_id=eos)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GenerationConfig":
        declared = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        return cls(**{k: v for k, v in data.items() if k in declared},
                   extra={k: v for k, v in data.items() if k not in declared})

    def to_dict(self) -> dict[str, Any]:
        """Set fields only (``None`` means unset, as in transformers 5), plus the keys kept in ``extra``."""
        values = {f.name: fields.to_json(getattr(self, f.name)) for f in dataclasses.fields(self)
                  if f.name != "extra" and getattr(self, f.name) is not None}
        return {**self.extra, **values}

    @classmethod
    def from_json_file(cls, path) -> "GenerationConfig":
        """Reads a ``generation_config.json`` file (transformers' or ours)."""
        config = cls.from_dict(storage.read_json(path))
        # transformers lets a config that is unchanged since loading be saved back despite ignored settings.
        object.__setattr__(config, "_unchanged_since_loading", True)
        return config

    def save(self, path) -> None:
        """Writes the JSON file ``path`` as is (``save_pretrained`` checks the settings first)."""
        storage.write_json(self.to_dict(), path)

    @classmethod
    def from_pretrained(cls, pretrained_model_name: str | os.PathLike, config_file_name: str | None = None,
                        **kwargs) -> "GenerationConfig":
        """Loads ``generation_config.json`` (or ``config_file_name``) from a local folder or a Hub repo id, as
        transformers' ``GenerationConfig.from_pretrained``; ``kwargs`` replace fields of the loaded config (an
        unknown name is a GenerationConfigError). A missing or unreadable file is a ``CheckpointError`` naming it."""
        name = config_file_name or GENERATION_CONFIG_FILE
        folder = resolve_model_folder(pretrained_model_name, [name])
        config = cls.from_json_file(folder / name)
        if not kwargs:
            return config
        config = config.replace(**kwargs)
        object.__setattr__(config, "_unchanged_since_loading", True)  # transformers counts kwargs as loaded
        return config

    def check_savable(self) -> None:
        """Raises GenerationConfigError, as transformers' ``save_pretrained`` refuses to save, for settings that
        do not apply in the config's mode (``ignored_settings``: e.g. ``temperature`` without ``do_sample``),
        unless the config is unchanged since it was loaded: a published config can always be saved back."""
        strict = not getattr(self, "_unchanged_since_loading", False)
        try:
            self.validate(strict=strict)
        except GenerationConfigError as error:
            raise GenerationConfigError(f"{error}. Fix these settings to save the configuration.") from None

    def save_pretrained(self, save_directory: str | os.PathLike, config_file_name: str | None = None):
        """Writes ``save_directory/generation_config.json`` (or ``config_file_name``) into a local folder or a
        bucket URL and returns its path, after ``check_savable``."""
        self.check_savable()
        folder = paths.as_path(save_directory)
        if paths.is_file(folder):
            raise GenerationConfigError(f"save_directory {save_directory} is a file; pass a folder")
        if not paths.is_url(save_directory):
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / (config_file_name or GENERATION_CONFIG_FILE)
        self.save(path)
        return path

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        """The generation settings of an ``EncoderDecoderConfig``, as transformers' ``from_model_config`` merges
        them: the top level's token ids, then every setting the decoder's ``config.json`` holds that is still at
        its default (its token ids; BART's ``forced_eos_token_id``; the ``num_beams``, ``max_length``... that
        transformers 4 wrote into every config). transformers' default ``max_length`` of 20 is ours unset."""
        top = {name: getattr(config, name) for name in ("decoder_start_token_id", "pad_token_id", "eos_token_id")
               if getattr(config, name, None) is not None}
        default, decoder = cls(), config.decoder.to_dict()
        lifted = {name: value for name, value in decoder.items()
                  if name in _FIELD_NAMES and name not in top and value != getattr(default, name)
                  and not (name == "max_length" and value == TRANSFORMERS_DEFAULT_MAX_LENGTH)}
        return cls.from_dict({**lifted, **top})


_DATACLASS_INIT = GenerationConfig.__init__


def _init_keeping_other_keys(self, *args, extra: Mapping[str, Any] | None = None, **kwargs) -> None:
    """``GenerationConfig(**kwargs)``: as transformers' constructor, keyword arguments that are no field (an option
    jaxencdec does not implement, such as ``typical_p``, or a key of the user's own) are kept in ``extra``, written
    back to ``generation_config.json``; ``resolve`` refuses those of ``NOT_IMPLEMENTED`` unless neutral."""
    others = {name: kwargs.pop(name) for name in list(kwargs) if name not in _FIELD_NAMES}
    _DATACLASS_INIT(self, *args, extra={**(extra or {}), **others}, **kwargs)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(GenerationConfig))
GenerationConfig.__init__ = _init_keeping_other_keys

"""GenerationConfig: transformers' field names and defaults, read from and written to generation_config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from jaxencdec.checkpoint.io import read_json, write_json


class GenerationConfigError(ValueError):
    """A generation setting is out of range or inconsistent."""


def _tuple(value):
    """Lists (JSON) -> tuples (hashable: the config is a static jit argument)."""
    if isinstance(value, list):
        return tuple(_tuple(v) for v in value)
    return value


def _list(value):
    if isinstance(value, tuple):
        return [_list(v) for v in value]
    return value


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate; every field means what it means in transformers' ``GenerationConfig``.

    ``max_new_tokens`` wins over ``max_length`` (which counts the decoder start token) when both are set.
    ``eos_token_id`` may be an int or a tuple of ints; ``bad_words_ids`` a tuple of token-id tuples.
    """

    max_length: int = 20
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
    repetition_penalty: float = 1.0
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    output_scores: bool = False
    return_dict_in_generate: bool = False
    # Keys of generation_config.json this class does not model, kept for the way back.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        for name in ("eos_token_id", "bad_words_ids"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raises GenerationConfigError for settings transformers would reject or that make no sense."""
        def check(ok, message):
            if not ok:
                raise GenerationConfigError(message)

        check(self.max_new_tokens is None or self.max_new_tokens > 0,
              f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        check(self.max_length > 0, f"max_length must be > 0, got {self.max_length}")
        check(self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}")
        check(self.num_return_sequences >= 1, f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        check(self.num_return_sequences <= self.num_beams or (self.do_sample and self.num_beams == 1),
              f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")
        check(self.early_stopping in (True, False, "never"),
              f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check(self.no_repeat_ngram_size >= 0, f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.do_sample:
            check(self.temperature > 0, f"temperature must be > 0 when sampling, got {self.temperature}")
            check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
            check(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")

    def replace(self, **changes) -> "GenerationConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise GenerationConfigError(f"unknown generation option(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GenerationConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: _list(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **values}

    @classmethod
    def from_json_file(cls, path) -> "GenerationConfig":
        return cls.from_dict(read_json(path))

    def save(self, path) -> None:
        write_json(self.to_dict(), path)

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        """The token ids of an ``EncoderDecoderConfig`` (top level first, then the decoder's), as transformers
        merges them."""
        def pick(name):
            top = getattr(config, name, None)
            return top if top is not None else getattr(config.decoder, name, None)

        return cls(decoder_start_token_id=pick("decoder_start_token_id"), pad_token_id=pick("pad_token_id"),
                   eos_token_id=pick("eos_token_id"), bos_token_id=config.decoder.bos_token_id)

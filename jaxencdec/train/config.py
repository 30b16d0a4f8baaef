"""Run configuration: frozen dataclasses read from a small JSON file, with ``--set key=value`` overrides.

A run config has one object per section (all optional except ``model`` and ``data``)::

    {"output_dir": "runs/x",
     "model": {...ModelSection}, "data": {...DataConfig}, "optim": {...OptimConfig},
     "train": {...TrainSection}, "mesh": {...MeshConfig}, "eval": {...EvalSection},
     "checkpoint": {...CheckpointSection}, "distributed": {...DistributedConfig}}

Keys starting with ``_`` are comments. Paths may start with ``package:NAME/`` for a folder inside an installed
Python package (``package:aclsum/dataset/train.jsonl``). Unknown keys, wrong types and impossible values raise
``RunConfigError`` naming the key, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from jaxencdec import fields, paths
from jaxencdec.config import REMAT_POLICIES, EncoderDecoderConfig
from jaxencdec.generation.config import GenerationConfig, GenerationConfigError
from jaxencdec.parallel.mesh import DistributedConfig, MeshConfig, MeshError
from jaxencdec.train.data import DataConfig, DataError
from jaxencdec.train.metrics import TEXT_METRICS, metric_name


PATH_KEYS = ("pretrained", "encoder", "decoder", "tokenizer", "decoder_tokenizer", "train_file", "eval_file")


class RunConfigError(ValueError):
    """A run config key is unknown, has the wrong type, or an impossible value."""


@dataclass(frozen=True)
class ModelSection:
    """Which model to train.

    Exactly one source: ``pretrained`` (an encoder-decoder folder or hub id), ``encoder`` + ``decoder`` (two
    standalone checkpoints to warm-start from), or ``encoder_config`` + ``decoder_config`` (Hugging Face
    config dicts: a randomly initialized model, for tests and from-scratch runs).
    ``tokenizer`` defaults to the encoder's folder; ``decoder_tokenizer`` to ``tokenizer``.
    ``compute_dtype``: ``float32`` or ``bfloat16`` (params and optimizer state stay float32).
    ``remat``: what each layer keeps for the backward pass (``none``, ``full``, ``dots_saveable``,
    ``dots_with_no_batch_dims_saveable``: less memory for more compute); ``scan_layers``: each stack's layers run as
    one ``nn.scan`` (compile time independent of depth). Neither changes what is computed or what files hold.
    """

    pretrained: str | None = None
    encoder: str | None = None
    decoder: str | None = None
    encoder_config: Mapping[str, Any] | None = None
    decoder_config: Mapping[str, Any] | None = None
    tokenizer: str | None = None
    decoder_tokenizer: str | None = None
    decoder_start_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    compute_dtype: str = "float32"
    init_seed: int = 0
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        sources = [self.pretrained is not None, self.encoder is not None or self.decoder is not None,
                   self.encoder_config is not None or self.decoder_config is not None]
        if sum(sources) != 1:
            raise RunConfigError("model: set exactly one of 'pretrained', 'encoder'+'decoder', or "
                                 "'encoder_config'+'decoder_config'")
        if sources[1] and (self.encoder is None or self.decoder is None):
            raise RunConfigError("model: warm-starting needs both 'encoder' and 'decoder'")
        if sources[2] and (self.encoder_config is None or self.decoder_config is None):
            raise RunConfigError("model: a random init needs both 'encoder_config' and 'decoder_config'")
        if sources[2] and self.tokenizer is None:
            raise RunConfigError("model: a randomly initialized model needs 'tokenizer'")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise RunConfigError(f"model.compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise RunConfigError(f"model.remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")

    @property
    def dtype(self) -> jnp.dtype:
        """The compute dtype of training, eval and eval generation (parameters stay float32)."""
        return jnp.dtype(jnp.bfloat16 if self.compute_dtype == "bfloat16" else jnp.float32)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then ``linear`` / ``cosine`` / ``constant`` decay to
    ``learning_rate * end_lr_ratio`` at ``train.num_steps``; no weight decay on biases, norms and (unless
    ``decay_embeddings``) embedding tables; global-norm clipping (``max_grad_norm`` 0 = off)."""

    learning_rate: float = 5e-5
    warmup_steps: int = 0
    schedule: str = "linear"
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    decay_embeddings: bool = True
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    # Per parameter group learning rates: {regex on the "/"-joined param path: multiplier}; first match wins.
    # E.g. {"cross_attention|lm_head": 10.0} trains the newly initialized parts of a warm start faster.
    lr_multipliers: Mapping[str, float] = field(default_factory=dict)
    # Parameters kept fixed: regexes on the "/"-joined param path (any match). No gradient is computed for them
    # (their backward pass is skipped) and no update is applied. E.g. ["^encoder/"] trains the decoder only.
    freeze: tuple[str, ...] = ()

    def __post_init__(self):
        named = [("lr_multipliers", p) for p in self.lr_multipliers] + [("freeze", p) for p in self.freeze]
        for where, pattern in named:
            try:
                re.compile(pattern)
            except re.error as e:
                raise RunConfigError(f"optim.{where}: {pattern!r} is not a valid regex ({e})") from None
        for pattern, factor in self.lr_multipliers.items():
            if not factor >= 0:
                raise RunConfigError(f"optim.lr_multipliers[{pattern!r}] must be >= 0, got {factor}")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise RunConfigError(f"optim.schedule must be linear, cosine or constant, got {self.schedule!r}")
        if self.learning_rate <= 0 or self.warmup_steps < 0 or not 0 <= self.label_smoothing < 1:
            raise RunConfigError("optim: learning_rate > 0, warmup_steps >= 0 and 0 <= label_smoothing < 1")


@dataclass(frozen=True)
class TrainSection:
    """``batch_size`` is the global batch (all processes, all micro-batches); ``micro_batches`` splits it for
    gradient accumulation. ``dropout``: False turns every dropout off (deterministic forward)."""

    batch_size: int = 8
    micro_batches: int = 1
    num_steps: int = 1000
    seed: int = 0
    dropout: bool = True
    log_every: int = 10
    progress_bar: bool = True
    tensorboard: bool = True
    plot: bool = True

    def __post_init__(self):
        if self.batch_size < 1 or self.micro_batches < 1 or self.num_steps < 1 or self.log_every < 1:
            raise RunConfigError("train: batch_size, micro_batches, num_steps and log_every must be >= 1")
        if self.batch_size % self.micro_batches:
            raise RunConfigError(f"train.batch_size {self.batch_size} is not divisible by "
                                 f"train.micro_batches {self.micro_batches}")


# The decoding settings that EvalSection holds as keys of its own, not in ``eval.generation``.
OWN_GENERATION_KEYS = ("num_beams", "max_new_tokens", "length_penalty", "no_repeat_ngram_size")


@dataclass(frozen=True)
class EvalSection:
    """Every ``every`` steps (0: only at the end; -1: never): loss on ``data.eval_file``, and when ``generate``
    is on, ``metric`` (``rouge``: ROUGE-1/2/L F1 x 100 via rouge-score; ``bleu``: sacreBLEU, 0-100) of beam-search
    outputs. ``best_metric`` (``eval/loss``, ``eval/rouge1``, ``eval/rouge2``, ``eval/rougeL`` or ``eval/bleu``;
    the older names ``eval_loss``, ``rougeL``, ... are accepted) picks the exported best model; ``best_mode`` min
    or max.

    The decoding is ``num_beams``, ``max_new_tokens``, ``length_penalty``, ``no_repeat_ngram_size`` and
    ``generation``: any other setting of transformers' ``GenerationConfig`` by its name (``repetition_penalty``,
    ``encoder_repetition_penalty``, ``min_new_tokens``, ``forced_bos_token_id``, ``bad_words_ids``, ...). The
    exported models' ``generation_config.json`` holds this decoding, so that ``generate`` on them decodes as the
    eval did."""

    every: int = 0
    batch_size: int = 8
    max_batches: int | None = None
    generate: bool = False
    metric: str = "rouge"
    num_beams: int = 4
    max_new_tokens: int = 64
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    generation: Mapping[str, Any] = field(default_factory=dict)
    best_metric: str = "eval/loss"
    best_mode: str = "min"

    def __post_init__(self):
        if self.metric not in TEXT_METRICS:
            raise RunConfigError(f"eval.metric must be 'rouge' or 'bleu', got {self.metric!r}")
        object.__setattr__(self, "best_metric", metric_name(self.best_metric))
        known = ("eval/loss",) + TEXT_METRICS[self.metric]
        if self.best_metric not in known:
            raise RunConfigError(f"eval.best_metric {self.best_metric!r} is not a metric of this eval (eval.metric "
                                 f"{self.metric!r}); choose one of {', '.join(known)}")
        if self.best_mode not in ("min", "max"):
            raise RunConfigError(f"eval.best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.batch_size < 1:
            raise RunConfigError("eval.batch_size must be >= 1")
        own = sorted(set(self.generation) & set(OWN_GENERATION_KEYS))
        if own:
            raise RunConfigError(f"eval.generation: set {', '.join(own)} as eval.{own[0]} (a key of eval itself)")
        try:
            GenerationConfig().replace(**self.generation)
        except (GenerationConfigError, TypeError) as e:
            raise RunConfigError(f"eval.generation: {e}") from None

    def generation_config(self, model_config: EncoderDecoderConfig) -> GenerationConfig:
        """The decoding of eval: these settings, the model's token ids."""
        eos = model_config.eos_token_id
        return GenerationConfig.from_model_config(model_config).replace(
            num_beams=self.num_beams, max_new_tokens=self.max_new_tokens, length_penalty=self.length_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size, early_stopping=True if self.num_beams > 1 else False,
            decoder_start_token_id=model_config.decoder_start_token_id, pad_token_id=model_config.pad_token_id,
            eos_token_id=eos[0] if isinstance(eos, tuple) else eos, **self.generation)


@dataclass(frozen=True)
class CheckpointSection:
    """Orbax checkpoints under ``{output_dir}/checkpoints`` every ``every`` steps (0: only at the end), the
    last ``keep`` kept; ``async_save`` writes in the background. The final model (and the best one, when eval
    runs) is also exported with ``save_pretrained`` to ``{output_dir}/final_model`` / ``best_model``.

    ``resume_step``: resume from this kept checkpoint instead of the newest; the newer ones are moved aside to
    ``checkpoints/<step>.discarded-<n>`` (training goes on from the chosen step). ``allow_schedule_change``:
    resume even though the learning-rate schedule settings (``optim.learning_rate``, ``warmup_steps``,
    ``schedule``, ``end_lr_ratio``, ``train.num_steps``) differ from the checkpoint's; the new schedule then
    applies from the resumed step on."""

    every: int = 500
    keep: int = 2
    async_save: bool = True
    export_final: bool = True
    resume_step: int | None = None
    allow_schedule_change: bool = False

    def __post_init__(self):
        if self.every < 0 or self.keep < 1:
            raise RunConfigError("checkpoint: every >= 0 and keep >= 1")
        if self.resume_step is not None and self.resume_step < 1:
            raise RunConfigError(f"checkpoint.resume_step must be a saved step (>= 1), got {self.resume_step}")


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection
    data: DataConfig
    output_dir: str = "runs/default"
    optim: OptimConfig = OptimConfig()
    train: TrainSection = TrainSection()
    mesh: MeshConfig = MeshConfig()
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection()
    distributed: DistributedConfig = DistributedConfig()

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return fields.to_json(dataclasses.asdict(self))

    # ------------------------------------------------------------------ reading

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        return _build(cls, data, "")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> "RunConfig":
        """Reads ``path`` and applies ``key.sub=value`` overrides (values parsed as JSON, else kept as strings).

        Relative file paths in ``data`` stay relative to the working directory (as on the command line).
        """
        try:
            data = json.loads(paths.read_text(path))  # a local file or a bucket URL
        except FileNotFoundError:
            raise RunConfigError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise RunConfigError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise RunConfigError(f"config file {path} must hold a JSON object")
        return cls.from_dict(apply_overrides(data, overrides))


def check_shapes(config: RunConfig, num_devices: int, num_processes: int) -> tuple[int, int, int]:
    """The mesh shape on ``num_devices`` devices of ``num_processes`` processes; ``RunConfigError`` when the mesh
    or a batch does not divide over them."""
    try:
        shape = config.mesh.resolve(num_devices)
    except MeshError as e:
        raise RunConfigError(f"mesh: {e}") from None
    shards = shape[0] * shape[1]
    batch, micro = config.train.batch_size, config.train.micro_batches
    if batch % (micro * shards):
        raise RunConfigError(f"train.batch_size {batch} is not divisible by micro_batches x data shards "
                             f"({micro} x data={shape[0]} x fsdp={shape[1]} = {micro * shards})")
    if batch % num_processes:
        raise RunConfigError(f"train.batch_size {batch} is not divisible by the {num_processes} processes")
    if config.eval.every >= 0 and (config.eval.batch_size % shards or config.eval.batch_size % num_processes):
        raise RunConfigError(f"eval.batch_size {config.eval.batch_size} is not divisible by the {shards} data "
                             f"shards and the {num_processes} processes")
    return shape


def check_lengths(config: RunConfig, model_config: EncoderDecoderConfig) -> None:
    """``RunConfigError`` when the data lengths exceed the positions the encoder / decoder embed."""
    for side, spec in (("source", model_config.encoder_spec), ("target", model_config.decoder_spec)):
        length = getattr(config.data, f"max_{side}_length")
        if length > spec.max_length:
            role = "encoder" if side == "source" else "decoder"
            raise RunConfigError(f"data.max_{side}_length {length} exceeds the {role}'s {spec.max_length} positions")


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``["optim.learning_rate=1e-4", "data.train_file=x.jsonl"]`` applied to a nested dict (a copy)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RunConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RunConfigError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def _build(cls, data: Mapping[str, Any], prefix: str):
    if not isinstance(data, Mapping):
        raise RunConfigError(f"{prefix.rstrip('.') or 'config'} must be a JSON object, got {type(data).__name__}")
    hints = fields.field_types(cls)
    data = {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys document a config
    retired = [name for name in getattr(cls, "RETIRED_KEYS", {}) if name in data]
    if retired:
        raise RunConfigError(f"{prefix}{retired[0]}: {cls.RETIRED_KEYS[retired[0]]}")
    unknown = fields.unknown_names(sorted(data), hints, show=lambda name: prefix + name)
    if unknown:
        raise RunConfigError(f"unknown config key(s) {', '.join(unknown)}; "
                             f"known in {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(hints))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
            continue
        if not fields.has_type(value, hint):
            raise RunConfigError(fields.wrong_type(prefix + name, value, hint))
        kwargs[name] = resolve_path(value) if name in PATH_KEYS else fields.frozen(value)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RunConfigError(f"config is missing {', '.join(prefix + m for m in missing)}")
    try:
        return cls(**kwargs)
    except (MeshError, DataError) as e:
        raise RunConfigError(f"{prefix.rstrip('.')}: {e}") from None
    except TypeError as e:
        raise RunConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def resolve_path(path: str | None) -> str | None:
    """``package:NAME/rest`` -> the ``rest`` inside installed package ``NAME``; other paths unchanged."""
    if path is None or not path.startswith("package:"):
        return path
    name, _, rest = path[len("package:"):].partition("/")
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RunConfigError(f"{path}: the Python package {name!r} is not installed")
    return os.path.join(os.path.dirname(spec.origin), rest)

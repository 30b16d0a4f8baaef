"""The training loop: model and data set-up, sharded state, orbax checkpoints with exact resume, eval, metrics.

``Trainer(config).run()`` trains ``config.train.num_steps`` optimizer steps. Every process of a multi-host run
executes the same code; each reads only its rows of every batch, all take part in checkpoint saves, and
process 0 alone prints, writes metrics and exports models.

``output_dir`` and the data files may be bucket URLs (``gs://bucket/run``; see :mod:`jaxencdec.paths` for the
credentials): orbax writes the checkpoints there through tensorstore, ``final_model``/``best_model`` are uploaded
with ``config.json`` last, and ``metrics.jsonl``, the TensorBoard events and ``metrics.png`` are written in a
local temporary folder and uploaded after each metrics row (see ``MetricsWriter``).

Resume: a checkpoint holds the ``TrainState`` (params, optimizer state, step, rng), the data position, the
run config and the global parameter norm of each save; rerunning the same command restores the latest complete
one (orbax writes into a temporary folder and renames it when done, so a save cut short is never picked; on a
bucket, which has no rename, a step folder counts once orbax has stored its ``commit_success.txt``) and continues
bit-for-bit as if never stopped. A checkpoint that fails to restore (damaged files) is reported and
moved aside to ``checkpoints/<step>.corrupt-<n>``, and the one before it is tried. ``checkpoint.resume_step``
picks an older checkpoint; the newer ones are moved aside to ``checkpoints/<step>.discarded-<n>``. A resume
whose learning-rate schedule settings differ from the checkpoint's is refused unless
``checkpoint.allow_schedule_change`` is set.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import linen as nn

from jaxencdec import paths
from jaxencdec.checkpoint import io
from jaxencdec.config import EncoderDecoderConfig, HFConfig
from jaxencdec.generation.config import GenerationConfig
from jaxencdec.modeling import EncoderDecoderModel
from jaxencdec.parallel.mesh import initialize_distributed, make_mesh
from jaxencdec.parallel.shard import (check_sharding, global_batch, init_sharded, named, param_specs, put_sharded,
                                      to_host)
from jaxencdec.tokenizer import Tokenizer
from jaxencdec.train import step as steps
from jaxencdec.train.config import RunConfig, RunConfigError, check_lengths, check_shapes
from jaxencdec.train.data import (HOST_ONLY_KEYS, DataError, PairEncoder, PairLoader, ShardLoader, read_pairs,
                                   read_shard)
from jaxencdec.train.metrics import MetricsWriter, metric_name, missing_metric_package, text_metrics

logger = logging.getLogger("jaxencdec")

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")


# The settings that define the learning rate of every step; a resume that changes one changes the schedule.
SCHEDULE_KEYS = ("optim.learning_rate", "optim.warmup_steps", "optim.schedule", "optim.end_lr_ratio",
                 "train.num_steps")
# A checkpoint whose parameter norm is this many times the previous one's is reported as a jump.
NORM_JUMP = 4.0
# The file orbax writes last into a checkpoint's step folder on a bucket (where it cannot rename a finished one).
ORBAX_COMMIT_FILE = "commit_success.txt"


class TrainingDivergedError(RuntimeError):
    """The loss or the gradients became NaN or infinite."""


class CheckpointError(RuntimeError):
    """No checkpoint of output_dir can be restored, or the chosen one cannot."""


# ---------------------------------------------------------------------- checks before any compile


def validate(config: RunConfig, num_devices: int, num_processes: int) -> tuple[int, int, int]:
    """Raises ``RunConfigError`` for a config that cannot run on these devices; returns the mesh shape."""
    shape = check_shapes(config, num_devices, num_processes)
    need_eval = config.eval.every >= 0
    try:
        config.data.check(need_eval)
    except DataError as e:
        raise RunConfigError(str(e)) from None
    m = config.model
    for name in ("pretrained", "encoder", "decoder", "tokenizer", "decoder_tokenizer"):
        path = getattr(m, name)
        if path and _looks_local(path) and not os.path.exists(os.path.expanduser(path)):
            raise RunConfigError(f"model.{name} {path} does not exist")
    package = missing_metric_package(config.eval.metric) if need_eval and config.eval.generate else None
    if package:
        raise RunConfigError(f"eval.metric {config.eval.metric!r} needs the {package} package, which is not "
                             f"installed: pip install {package} (or pip install 'jaxencdec[train]')")
    return shape


def checkpoint_steps(ckpt_dir: str) -> list[int]:
    """The steps of the complete checkpoints in ``ckpt_dir`` (orbax's step folders), ascending; no orbax call.

    On a bucket, where orbax writes a step's folder in place, a step is complete once its ``commit_success.txt``
    is stored (orbax's own test)."""
    if not paths.is_dir(ckpt_dir):
        return []
    numbered = [int(name) for name in paths.list_names(ckpt_dir) if name.isdigit()]
    if paths.is_url(ckpt_dir):
        return sorted(s for s in numbered if paths.is_file(os.path.join(ckpt_dir, str(s), ORBAX_COMMIT_FILE)))
    return sorted(s for s in numbered if os.path.isdir(os.path.join(ckpt_dir, str(s))))


def run_folder(output_dir: str) -> str:
    """``output_dir`` as the run's folder: a bucket URL as given, a local path made absolute."""
    return output_dir if paths.is_url(output_dir) else os.path.abspath(output_dir)


def schedule_changes(saved: dict[str, Any], config: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved value, value now)`` for the ``SCHEDULE_KEYS`` where ``config`` differs from ``saved`` (a
    run config dict stored with a checkpoint). ``train.num_steps`` counts only when the decay depends on it."""
    now = config.to_dict()
    changes = {}
    for key in SCHEDULE_KEYS:
        section, name = key.split(".")
        if name in saved.get(section, {}) and saved[section][name] != now[section][name]:
            changes[key] = (saved[section][name], now[section][name])
    schedules = {saved.get("optim", {}).get("schedule"), config.optim.schedule}
    if schedules == {"constant"}:
        changes.pop("train.num_steps", None)
    return changes


def summarize_error(error: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to about ``limit`` characters (tensorstore's spec dump dropped)."""
    lines = str(error).strip().splitlines()
    text = lines[0].split(" See full TensorStore details")[0] if lines else ""
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def norm_jump(norms: dict[int, float]) -> int | None:
    """The first step (ascending) whose parameter norm is not finite or ``NORM_JUMP`` x the previous one's."""
    ordered = sorted(norms.items())
    for (_, before), (step, norm) in zip(ordered, ordered[1:]):
        if not np.isfinite(norm) or norm > NORM_JUMP * before:
            return step
    return None


# ---------------------------------------------------------------------- model and tokenizers


@dataclass
class ModelBundle:
    model: EncoderDecoderModel  # params empty for a random init (they are born sharded later)
    tokenizer: Tokenizer
    decoder_tokenizer: Tokenizer
    tokenizer_dir: str
    decoder_tokenizer_dir: str
    decoder_start_token_id: int
    pad_token_id: int
    eos_token_id: int | None


def build_model(config: RunConfig) -> ModelBundle:
    m = config.model
    overrides = {k: getattr(m, k) for k in ("decoder_start_token_id", "pad_token_id", "eos_token_id")
                 if getattr(m, k) is not None}
    if m.pretrained:
        model = EncoderDecoderModel.from_pretrained(m.pretrained, **overrides)
        tok_dir = m.tokenizer or m.pretrained
        dec_dir = m.decoder_tokenizer or (os.path.join(m.pretrained, "decoder_tokenizer")
                                          if os.path.isdir(os.path.join(m.pretrained, "decoder_tokenizer"))
                                          else tok_dir)
    elif m.encoder:
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(m.encoder, m.decoder, **overrides)
        tok_dir = m.tokenizer or m.encoder
        dec_dir = m.decoder_tokenizer or (m.decoder if m.decoder != m.encoder and not m.tokenizer else tok_dir)
    else:
        cfg = EncoderDecoderConfig.from_encoder_decoder_configs(
            HFConfig.from_dict(dict(m.encoder_config)), HFConfig.from_dict(dict(m.decoder_config)), **overrides)
        model = EncoderDecoderModel(cfg, params={})
        tok_dir = m.tokenizer
        dec_dir = m.decoder_tokenizer or tok_dir
    tokenizer = Tokenizer.from_pretrained(tok_dir)
    decoder_tokenizer = tokenizer if dec_dir == tok_dir else Tokenizer.from_pretrained(dec_dir)
    mc = model.config
    start = _first(mc.decoder_start_token_id, decoder_tokenizer.cls_token_id, decoder_tokenizer.bos_token_id)
    pad = _first(mc.pad_token_id, decoder_tokenizer.pad_token_id, decoder_tokenizer.eos_token_id)
    eos = mc.eos_token_id[0] if isinstance(mc.eos_token_id, tuple) else mc.eos_token_id
    eos = _first(eos, decoder_tokenizer.eos_token_id, decoder_tokenizer.sep_token_id)
    if start is None or pad is None:
        raise RunConfigError("set model.decoder_start_token_id and model.pad_token_id (the model config and the "
                             "tokenizer name neither)")
    model.config = mc.replace(decoder_start_token_id=start, pad_token_id=pad, eos_token_id=eos)
    model.configure_layers(remat=m.remat, scan_layers=m.scan_layers)
    return ModelBundle(model, tokenizer, decoder_tokenizer, tok_dir, dec_dir, start, pad, eos)


def _looks_local(path: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is a local path."""
    if paths.is_url(path):
        return False
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.exists(path)


def _first(*values):
    return next((v for v in values if v is not None), None)


# ---------------------------------------------------------------------- the trainer


class Trainer:
    """Everything one run needs, built in dependency order; ``run()`` trains.

    Attributes of interest: ``mesh``, ``specs`` (``TrainState`` of ``PartitionSpec``), ``state`` (the live
    sharded ``TrainState``), ``train_step`` (jitted; replaceable in tests), ``manager`` (orbax).

    ``evaluate_only``: for ``evaluate`` alone (``jaxencdec eval``): output_dir must hold a checkpoint (checked
    before anything is built) unless ``restore`` is False, and nothing is written there (no folders, metrics
    or TensorBoard events; checkpoints are read only).
    """

    def __init__(self, config: RunConfig, *, log: Callable[[str], None] | None = None, restore: bool = True,
                 evaluate_only: bool = False):
        self.config = config
        self.evaluate_only = evaluate_only
        initialize_distributed(config.distributed)
        self.is_main = jax.process_index() == 0
        self._log = log or (lambda s: print(s, flush=True))
        self._bar = None  # the tqdm progress bar while one is shown
        validate(config, jax.device_count(), jax.process_count())
        self.out_dir = run_folder(config.output_dir)
        self.ckpt_dir = os.path.join(self.out_dir, "checkpoints")
        if restore:
            self._check_checkpoints_exist()
        if not evaluate_only and not paths.is_url(self.out_dir):  # a bucket has no folders to create
            os.makedirs(self.out_dir, exist_ok=True)
        self.mesh = make_mesh(config.mesh)
        self.rules = config.mesh.logical_rules
        self._report_devices()

        bundle = build_model(config)
        self.bundle = bundle
        self.model = bundle.model

        data = config.data
        self.encoder = PairEncoder(bundle.tokenizer, bundle.decoder_tokenizer, data.max_source_length,
                                   data.max_target_length, bundle.decoder_start_token_id, bundle.pad_token_id,
                                   bundle.eos_token_id)
        check_lengths(config, self.model.config)
        self.loader = self._train_loader()
        self.eval_pairs = read_pairs(data, "eval") if config.eval.every >= 0 else None

        # Params: born sharded for a random init, else placed shard by shard from the host copy.
        logical = self.model.logical_axes()
        self.logical = logical
        # Checked here, before any compile: a pattern matching no parameter is a RunConfigError.
        frozen = steps.frozen_mask(logical, config.optim.freeze) if config.optim.freeze else None
        if self.model.params:
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), self.model.params)
            pspecs = param_specs(logical, shapes, self.mesh, self.rules)
            params = put_sharded(jax.tree.map(lambda x: np.asarray(x, np.float32), self.model.params), self.mesh,
                                 pspecs)
            self.model.params = {}  # the host copy is no longer needed
        else:
            init = lambda rng: nn.unbox(self.model._init_fn(rng))["params"]
            params, pspecs = init_sharded(init, jax.random.key(config.model.init_seed), logical, self.mesh,
                                          self.rules)
        self._report_parameters(params, frozen)
        self.sharding_report = check_sharding(params, pspecs, self.mesh, logical, self.rules)
        if not self.sharding_report.ok:
            raise RuntimeError(self.sharding_report.summary())
        param_split = self.mesh.shape["fsdp"] * self.mesh.shape["model"] > 1  # else replicas are the plan
        if self.sharding_report.unfitted or (param_split and self.sharding_report.replicated):
            self.info(self.sharding_report.summary())

        run_steps = steps.make_run_steps(config, self.model.config, params, pspecs, self.mesh, frozen)
        self.schedule, self.optimizer, self.specs = run_steps.schedule, run_steps.optimizer, run_steps.specs
        self.state = steps.init_state(params, self.optimizer, config.train.seed, self.mesh, self.specs)
        self.train_step, self.eval_step = run_steps.train_step, run_steps.eval_step
        self._generate_fn = None
        self._param_norm = jax.jit(optax.tree.norm)

        self.manager = self._checkpoint_manager() if restore or not evaluate_only else None
        self.best: dict[str, Any] = {"value": None, "step": None}
        self.param_norms: dict[int, float] = {}  # step -> global parameter norm: the start and every save
        self.resumed_from = self._restore() if restore else None
        self.metrics = MetricsWriter(self.out_dir, enabled=self.is_main and not evaluate_only,
                                     tensorboard=config.train.tensorboard,
                                     keep_through_step=int(jax.device_get(self.state.step)))

    # ------------------------------------------------------------------ helpers

    def _train_loader(self) -> PairLoader:
        """The whole file's loader, or with ``data.streaming`` this process's shard's (``ShardLoader``)."""
        data, batch = self.config.data, self.config.train.batch_size
        index, count = jax.process_index(), jax.process_count()
        if data.streaming:
            return ShardLoader(read_shard(data, "train", index, count), self.encoder, batch, index, count,
                               seed=data.seed, shuffle=data.shuffle, buckets=data.source_buckets)
        return PairLoader(read_pairs(data, "train"), self.encoder, batch, index, count, train=True, seed=data.seed,
                          shuffle=data.shuffle, buckets=data.source_buckets)

    def info(self, message: str) -> None:
        """Prints ``message`` on process 0; above the progress bar while one is shown (``tqdm.write``'s way)."""
        if not self.is_main:
            return
        if self._bar is None:
            self._log(message)
            return
        with self._bar.external_write_mode():
            self._log(message)

    def _check_checkpoints_exist(self) -> None:
        """Fails at once when ``evaluate_only`` finds no checkpoint or ``checkpoint.resume_step`` is not kept."""
        kept = checkpoint_steps(self.ckpt_dir)
        if self.evaluate_only and not kept:
            raise FileNotFoundError(f"no checkpoint in {self.ckpt_dir}: train first (jaxencdec train CONFIG) or "
                                    f"pass --model FOLDER")
        chosen = self.config.checkpoint.resume_step
        if chosen is not None and chosen not in kept:
            raise RunConfigError(f"checkpoint.resume_step {chosen}: there is no such checkpoint in {self.ckpt_dir} "
                                 f"(kept steps: {', '.join(map(str, kept)) or 'none'})")

    def warn(self, message: str) -> None:
        if self.is_main:
            logger.warning(message)

    def _report_devices(self) -> None:
        devices = jax.devices()
        kinds = ", ".join(sorted({d.device_kind for d in devices}))
        processes = jax.process_count()
        self.info(f"devices: {len(devices)} x {kinds} (platform {devices[0].platform}"
                  + (f", {processes} processes)" if processes > 1 else ")"))
        self.info("mesh: " + ", ".join(f"{axis} {size}" for axis, size in self.mesh.shape.items()))

    def _report_parameters(self, params, frozen) -> None:
        total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        if frozen is None:
            self.info(f"parameters: {total:,} (all trainable)")
            return
        trainable = sum(jax.tree.leaves(jax.tree.map(lambda x, f: 0 if f else int(np.prod(x.shape)), params,
                                                     frozen)))
        self.info(f"parameters: {total:,} ({trainable:,} trainable, {total - trainable:,} frozen by optim.freeze)")

    def _checkpoint_manager(self) -> ocp.CheckpointManager:
        ck = self.config.checkpoint
        if self.evaluate_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                                   save_interval_steps=0, cleanup_tmp_directories=False)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=ck.keep, enable_async_checkpointing=ck.async_save,
                                                   cleanup_tmp_directories=True, create=True)
        return ocp.CheckpointManager(self.ckpt_dir, options=options, item_names=("state", "data", "meta"))

    def close(self) -> None:
        """Waits for a save in flight and closes the checkpoint manager and the metrics writers."""
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
        self.metrics.close()

    def _abstract_state(self):
        shardings = named(self.mesh, self.specs)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state, shardings)

    def _restore(self) -> int | None:
        """Restores the newest checkpoint that restores, or ``checkpoint.resume_step``; returns its step (None:
        there is none). Newer checkpoints are moved aside (see the module docstring) unless ``evaluate_only``."""
        kept = sorted(self.manager.all_steps(), reverse=True)
        chosen = self.config.checkpoint.resume_step  # a kept step: checked in __init__
        if not kept:
            return None
        restored, failed = None, {}
        for step in [chosen] if chosen is not None else kept:
            try:
                restored = self._read_checkpoint(step)
                break
            except Exception as error:  # damaged files: tensorstore, JSON and pytree-structure errors alike
                failed[step] = summarize_error(error)
                if chosen is not None:
                    raise CheckpointError(f"checkpoint step {step} in {self.ckpt_dir} cannot be restored "
                                          f"({failed[step]}); choose another checkpoint.resume_step (kept steps: "
                                          f"{', '.join(map(str, sorted(kept)))})") from error
                self.warn(f"checkpoint step {step} in {self.ckpt_dir} cannot be restored ({failed[step]}); "
                          f"trying the one before it")
        if restored is None:
            reasons = "; ".join(f"step {s}: {why}" for s, why in failed.items())
            raise CheckpointError(f"no checkpoint in {self.ckpt_dir} can be restored ({reasons}). If the model, "
                                  f"mesh or data settings changed since they were written, restore those; to start "
                                  f"over, use a new output_dir or move {self.ckpt_dir} away")
        meta = restored["meta"]
        self.loader.set_state(restored["data"])  # a changed data file fails here, before anything is moved
        if not self.evaluate_only:
            self._check_schedule(step, meta.get("config", {}))
            for newer in (s for s in kept if s > step):
                self._move_aside(newer, "corrupt" if newer in failed else "discarded")
        self.state = restored["state"]
        best = meta.get("best", self.best)
        self.best = {**best, "metric": metric_name(best["metric"])} if "metric" in best else best
        self.param_norms = {int(k): v for k, v in meta.get("param_norms", {}).items()}
        self.info(f"{'evaluating' if self.evaluate_only else 'resumed from'} checkpoint step {step} in "
                  f"{self.ckpt_dir}")
        return step

    def _read_checkpoint(self, step: int) -> dict[str, Any]:
        """Checkpoint ``step``'s state, data position and metadata; a state saved in the other layer layout
        (``model.scan_layers``, recorded in the metadata's config) is read in its own layout and converted."""
        target = self._abstract_state()
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved_scanned = bool(meta.get("config", {}).get("model", {}).get("scan_layers", False))
        scanned = self.model.config.scan_layers
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(steps.state_in_layout(target, saved_scanned)),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        state = restored["state"]
        if saved_scanned != scanned:
            self.info(f"checkpoint step {step} holds {'scanned' if saved_scanned else 'unrolled'} layers: converted")
            shardings = jax.tree.map(lambda x: x.sharding, target)
            state = jax.device_put(steps.state_in_layout(state, scanned), shardings)
        return {"state": state, "data": restored["data"], "meta": restored["meta"]}

    def _move_aside(self, step: int, label: str) -> None:
        """Renames checkpoint ``step`` to ``<step>.<label>-<n>`` (orbax no longer sees it; the step can be saved
        again). Process 0 renames; every process waits for it."""
        if self.is_main:
            n = 1
            while paths.exists(os.path.join(self.ckpt_dir, f"{step}.{label}-{n}")):
                n += 1
            target = os.path.join(self.ckpt_dir, f"{step}.{label}-{n}")
            paths.as_path(os.path.join(self.ckpt_dir, str(step))).rename(target)  # on a bucket: copy, then delete
            self.info(f"checkpoint step {step} moved aside to {target}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxencdec: checkpoint {step} moved aside")
        self.manager.reload()

    def _check_schedule(self, step: int, saved_config: dict[str, Any]) -> None:
        """Refuses (``RunConfigError``) a resume whose learning-rate schedule differs from the checkpoint's, unless
        ``checkpoint.allow_schedule_change``; then it warns."""
        changes = schedule_changes(saved_config, self.config)
        if not changes:
            return
        old_optim = dataclasses.replace(self.config.optim, **{k.split(".")[1]: old for k, (old, _) in changes.items()
                                                              if k.startswith("optim.")})
        old_steps = changes.get("train.num_steps", (self.config.train.num_steps,))[0]
        old_lr = float(steps.learning_rate_schedule(old_optim, old_steps)(step))
        what = (", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())
                + f": the learning rate of step {step + 1} becomes {float(self.schedule(step)):.3g} instead of "
                  f"{old_lr:.3g}")
        if self.config.checkpoint.allow_schedule_change:
            self.warn(f"resuming from checkpoint step {step} with a changed learning-rate schedule ({what})")
            return
        raise RunConfigError(f"checkpoint step {step} in {self.ckpt_dir} was trained with another learning-rate "
                             f"schedule ({what}). Use a new output_dir to train with the new settings, or pass "
                             f"--set checkpoint.allow_schedule_change=true to continue with them from step {step}")

    def save(self, step: int) -> None:
        """Saves the state, the data position, the best-so-far, the config and the parameter norms (async; all
        processes take part)."""
        self.param_norms[step] = float(self._param_norm(self.state.params))
        meta = {"best": self.best, "config": self.config.to_dict(),
                "param_norms": {str(k): v for k, v in sorted(self.param_norms.items())}}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state), data=ocp.args.JsonSave(self.loader.get_state()),
            meta=ocp.args.JsonSave(meta)))

    def divergence_message(self, step: int, loss: float, grad_norm: float) -> str:
        """One line: where training diverged, the global parameter norm of the start and of each kept
        checkpoint, and which checkpoint to resume from."""
        self.manager.wait_until_finished()
        head = f"loss is {loss} (grad norm {grad_norm}) at step {step}: training stopped"
        kept = sorted(self.manager.all_steps())
        if not kept:
            return f"{head}; no checkpoint was written yet"
        norms = {s: n for s, n in self.param_norms.items() if s in kept or s == 0}
        listing = ", ".join(f"step {s}{' (start)' if s == 0 else ''} {norms[s]:.4g}" if s in norms else
                            f"step {s} not recorded" for s in sorted(set(norms) | set(kept)))
        jump = norm_jump(norms)
        before = [s for s in kept if jump is None or s < jump]
        if jump is None:
            advice = (f"no norm jumps, so step {kept[-1]} looks sound: rerunning resumes from it (an earlier "
                      f"one: --set checkpoint.resume_step=STEP)")
        elif before:
            advice = (f"the norm jumps at step {jump}, so that checkpoint already holds diverged params: resume "
                      f"from step {before[-1]} with --set checkpoint.resume_step={before[-1]}")
        else:
            advice = (f"the norm jumps at step {jump}: no kept checkpoint predates it; start over with a new "
                      f"output_dir")
        return (f"{head}. Global parameter norm of the kept checkpoints in {self.ckpt_dir}: {listing}; {advice} "
                f"(with a lower optim.learning_rate, add --set checkpoint.allow_schedule_change=true)")

    def device_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return global_batch({k: v for k, v in local.items() if k not in HOST_ONLY_KEYS}, self.mesh)

    def host_params(self):
        """The params as full numpy arrays on every process (collective in multi-host runs)."""
        return to_host(self.state.params)

    def export(self, folder: str) -> str | None:
        """``save_pretrained`` of the current params, plus tokenizer files and a generation config."""
        params = self.host_params()
        if not self.is_main:
            return None
        ev = self.config.eval
        beam_settings = dict(length_penalty=ev.length_penalty, early_stopping=True) if ev.num_beams > 1 else {}
        gen = GenerationConfig.from_model_config(self.model.config).replace(
            num_beams=ev.num_beams, max_new_tokens=ev.max_new_tokens, no_repeat_ngram_size=ev.no_repeat_ngram_size,
            **beam_settings)
        with io.atomic_folder(folder) as staging:  # local: swapped in whole; bucket: uploaded, config.json last
            EncoderDecoderModel(self.model.config, params=params, generation_config=gen).save_pretrained(staging)
            _copy_tokenizer(self.bundle.tokenizer_dir, str(staging))
            if self.bundle.decoder_tokenizer_dir != self.bundle.tokenizer_dir:
                _copy_tokenizer(self.bundle.decoder_tokenizer_dir, os.path.join(staging, "decoder_tokenizer"))
        return folder

    # ------------------------------------------------------------------ eval

    def generate_fn(self):
        """``make_generate_fn`` of the generation package, or None when it is not available."""
        if self._generate_fn is None:
            try:
                from jaxencdec.generation.api import make_generate_fn
            except ImportError as e:
                self.info(f"generation metrics skipped: jaxencdec.generation.api is not available ({e})")
                self._generate_fn = False
                return None
            mc = self.model.config
            self._generate_fn = make_generate_fn(mc, self.config.eval.generation_config(mc),
                                                 dtype=self.config.model.dtype)
        return self._generate_fn or None

    def evaluate(self, params=None, *, generate: bool | None = None) -> dict[str, float]:
        """``eval/loss`` over the eval file (token-weighted mean), ``eval/tokens`` (an int) and, with generation
        on, ``eval/rouge1``/``eval/rouge2``/``eval/rougeL`` or ``eval/bleu`` (0-100)."""
        ev = self.config.eval
        params = self.state.params if params is None else params
        if self.eval_pairs is None:
            self.eval_pairs = read_pairs(self.config.data, "eval")
        loader = PairLoader(self.eval_pairs, self.encoder, ev.batch_size, jax.process_index(), jax.process_count(),
                            train=False, buckets=self.config.data.source_buckets)
        generate = ev.generate if generate is None else generate
        gen_fn = self.generate_fn() if generate else None
        loss_sum, tokens = 0.0, 0.0
        predictions: dict[int, str] = {}
        for i, local in enumerate(loader):
            if ev.max_batches is not None and i >= ev.max_batches:
                break
            batch = self.device_batch(local)
            out = self.eval_step(params, batch)
            loss_sum += float(out["loss_sum"])
            tokens += float(out["tokens"])
            if gen_fn is not None:
                sequences = gen_fn(params, batch["input_ids"], batch["attention_mask"], jax.random.key(0))
                sequences = np.asarray(to_host(getattr(sequences, "sequences", sequences)))
                if sequences.ndim == 3:  # [batch, num_return_sequences, length]: keep the best
                    sequences = sequences[:, 0]
                index = to_host(global_batch({"i": local["example_index"], "w": local["weights"]}, self.mesh))
                rows, weights = index["i"], index["w"]
                texts = self.bundle.decoder_tokenizer.batch_decode(sequences, skip_special_tokens=True)
                predictions.update({int(r): t for r, t, w in zip(rows, texts, weights) if w > 0})
        result = {"eval/loss": loss_sum / max(tokens, 1.0), "eval/tokens": int(tokens)}
        if predictions:
            refs = [self.eval_pairs[i][1] for i in sorted(predictions)]
            hyps = [predictions[i] for i in sorted(predictions)]
            result.update({f"eval/{k}": v for k, v in text_metrics(ev.metric, hyps, refs).items()})
        return result

    def _eval_and_track(self, step: int) -> dict[str, float]:
        result = self.evaluate()
        self.metrics.write(step, result)
        value = result.get(self.config.eval.best_metric)
        better = value is not None and (self.best["value"] is None or (
            value < self.best["value"] if self.config.eval.best_mode == "min" else value > self.best["value"]))
        if better:
            self.best = {"value": value, "step": step, "metric": self.config.eval.best_metric}
            self.export(os.path.join(self.out_dir, "best_model"))
        self.info(f"step {step}: " + ", ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}"
                                               for k, v in result.items()) + (" (best)" if better else ""))
        return result

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        cfg = self.config
        total = cfg.train.num_steps
        start = int(jax.device_get(self.state.step))
        ck_every, ev_every, log_every = cfg.checkpoint.every, cfg.eval.every, cfg.train.log_every
        if start == 0 and 0 not in self.param_norms:
            self.param_norms[0] = float(self._param_norm(self.state.params))
        bar = None
        if self.is_main and cfg.train.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
        self._bar = bar
        window: list[dict] = []
        pending = None  # (step, metrics) of the last dispatched step, read one step later
        last_time = time.perf_counter()
        last_eval: dict[str, Any] = self.metrics.last_eval(start)  # a resumed run's last eval so far

        def consume(item):
            nonlocal last_time
            step_no, metrics = item
            host = jax.device_get(metrics)
            if not host["finite"]:
                raise TrainingDivergedError(self.divergence_message(step_no, float(host["loss"]),
                                                                    float(host["grad_norm"])))
            window.append(host)
            if step_no % log_every == 0 or step_no == total:
                now = time.perf_counter()
                elapsed = now - last_time
                last_time = now
                row = {k: float(np.mean([w[k] for w in window])) for k in ("loss", "grad_norm", "learning_rate")}
                tok = sum(float(w["tokens"]) + float(w["source_tokens"]) for w in window)
                row["step_time"] = elapsed / len(window)
                row["tokens_per_s"] = tok / max(elapsed, 1e-9)
                window.clear()
                self.metrics.write(step_no, {f"train/{k}": v for k, v in row.items()})
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", step_s=f"{row['step_time']:.3f}",
                                    tok_s=f"{row['tokens_per_s']:.0f}")
                elif not cfg.train.progress_bar:
                    self.info(f"step {step_no}: loss {row['loss']:.4f}, {row['step_time']:.3f} s/step, "
                              f"{row['tokens_per_s']:.0f} tokens/s")

        try:
            for step_no in range(start + 1, total + 1):
                local = next(self.loader)
                if step_no == start + 1:
                    self.info("compiling the train step...")
                    compile_start = time.perf_counter()
                self.state, metrics = self.train_step(self.state, self.device_batch(local))
                if step_no == start + 1:  # jit compiles before it dispatches: the call's time is the compile's
                    self.info(f"train step compiled in {time.perf_counter() - compile_start:.1f} s")
                    last_time = time.perf_counter()
                if pending is not None:
                    consume(pending)
                pending = (step_no, metrics)
                if bar is not None:
                    bar.update(1)
                is_last = step_no == total
                do_eval = ev_every > 0 and step_no % ev_every == 0 or (ev_every == 0 and is_last)
                do_save = (ck_every > 0 and step_no % ck_every == 0) or is_last
                if do_eval or do_save:
                    consume(pending)  # never save or judge a state whose step diverged
                    pending = None
                if do_eval:
                    last_eval = {"step": step_no, **self._eval_and_track(step_no)}
                if do_save:
                    self.save(step_no)
            if pending is not None:
                consume(pending)
        finally:
            self.manager.wait_until_finished()
            if bar is not None:
                bar.close()
                self._bar = None
        final = None
        if cfg.checkpoint.export_final:
            final = self.export(os.path.join(self.out_dir, "final_model"))
        if cfg.train.plot:
            self.metrics.plot()
        self.close()
        return {"step": int(jax.device_get(self.state.step)), "resumed_from": self.resumed_from,
                "final_model": final, "best": self.best, "eval": last_eval}


def _copy_tokenizer(src: str, dst: str) -> None:
    if not os.path.isdir(src):
        return
    os.makedirs(dst, exist_ok=True)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def train(config: RunConfig) -> dict[str, Any]:
    """Builds a ``Trainer`` and runs it."""
    return Trainer(config).run()

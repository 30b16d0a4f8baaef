"""The training loop: model and data set-up, sharded state, orbax checkpoints with exact resume, eval, metrics.

``Trainer(config).run()`` trains ``config.train.num_steps`` optimizer steps. Every process of a multi-host run
executes the same code; each reads only its rows of every batch, all take part in checkpoint saves, and
process 0 alone prints, writes metrics and exports models.

Resume: a checkpoint holds the ``TrainState`` (params, optimizer state, step, rng) and the data position;
rerunning the same command restores the latest complete one (orbax writes into a temporary folder and renames
it when done, so a save cut short is never picked) and continues bit-for-bit as if never stopped.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from jaxencdec.config import EncoderDecoderConfig, HFConfig
from jaxencdec.generation.config import GenerationConfig
from jaxencdec.modeling import EncoderDecoderModel
from jaxencdec.models.encoder_decoder import EncoderDecoderModule
from jaxencdec.parallel.mesh import MeshError, initialize_distributed, make_mesh
from jaxencdec.parallel.shard import (check_sharding, global_batch, init_sharded, named, param_specs, put_sharded,
                                      to_host)
from jaxencdec.tokenizer import Tokenizer
from jaxencdec.train import step as steps
from jaxencdec.train.config import RunConfig, RunConfigError
from jaxencdec.train.data import HOST_ONLY_KEYS, DataError, PairEncoder, PairLoader, read_pairs
from jaxencdec.train.metrics import MetricsWriter, text_metrics

logger = logging.getLogger("jaxencdec")

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")


class TrainingDivergedError(RuntimeError):
    """The loss or the gradients became NaN or infinite."""


# ---------------------------------------------------------------------- checks before any compile


def validate(config: RunConfig, num_devices: int, num_processes: int) -> tuple[int, int, int]:
    """Raises ``RunConfigError`` for a config that cannot run on these devices; returns the mesh shape."""
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
    need_eval = config.eval.every >= 0
    if need_eval and (config.eval.batch_size % shards or config.eval.batch_size % num_processes):
        raise RunConfigError(f"eval.batch_size {config.eval.batch_size} is not divisible by the {shards} data "
                             f"shards and the {num_processes} processes")
    try:
        config.data.check(need_eval)
    except DataError as e:
        raise RunConfigError(str(e)) from None
    m = config.model
    for name in ("pretrained", "encoder", "decoder", "tokenizer", "decoder_tokenizer"):
        path = getattr(m, name)
        if path and _looks_local(path) and not os.path.exists(os.path.expanduser(path)):
            raise RunConfigError(f"model.{name} {path} does not exist")
    return shape


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
    return ModelBundle(model, tokenizer, decoder_tokenizer, tok_dir, dec_dir, start, pad, eos)


def _looks_local(path: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is a local path."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.exists(path)


def _first(*values):
    return next((v for v in values if v is not None), None)


# ---------------------------------------------------------------------- the trainer


class Trainer:
    """Everything one run needs, built in dependency order; ``run()`` trains.

    Attributes of interest: ``mesh``, ``specs`` (``TrainState`` of ``PartitionSpec``), ``state`` (the live
    sharded ``TrainState``), ``train_step`` (jitted; replaceable in tests), ``manager`` (orbax).
    """

    def __init__(self, config: RunConfig, *, log: Callable[[str], None] | None = None, restore: bool = True):
        self.config = config
        initialize_distributed(config.distributed)
        self.is_main = jax.process_index() == 0
        self._log = log or (lambda s: print(s, flush=True))
        validate(config, jax.device_count(), jax.process_count())
        self.out_dir = os.path.abspath(config.output_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.mesh = make_mesh(config.mesh)
        self.rules = config.mesh.logical_rules

        bundle = build_model(config)
        self.bundle = bundle
        self.model = bundle.model
        dtype = jnp.bfloat16 if config.model.compute_dtype == "bfloat16" else jnp.float32
        self.module = EncoderDecoderModule(self.model.config, dtype=dtype, param_dtype=jnp.float32)

        data = config.data
        self.encoder = PairEncoder(bundle.tokenizer, bundle.decoder_tokenizer, data.max_source_length,
                                   data.max_target_length, bundle.decoder_start_token_id, bundle.pad_token_id,
                                   bundle.eos_token_id)
        self._check_lengths()
        self.train_pairs = read_pairs(data, "train")
        self.loader = PairLoader(self.train_pairs, self.encoder, config.train.batch_size, jax.process_index(),
                                 jax.process_count(), train=True, seed=data.seed, shuffle=data.shuffle,
                                 buckets=data.source_buckets)
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
        self.sharding_report = check_sharding(params, pspecs, self.mesh, logical, self.rules)
        if not self.sharding_report.ok:
            raise RuntimeError(self.sharding_report.summary())
        param_split = self.mesh.shape["fsdp"] * self.mesh.shape["model"] > 1  # else replicas are the plan
        if self.sharding_report.unfitted or (param_split and self.sharding_report.replicated):
            self.info(self.sharding_report.summary())

        self.schedule = steps.learning_rate_schedule(config.optim, config.train.num_steps)
        self.optimizer = steps.make_optimizer(config.optim, config.train.num_steps, params, frozen)
        self.specs = steps.state_specs(pspecs, steps.state_shapes(params, self.optimizer))
        self.state = steps.init_state(params, self.optimizer, config.train.seed, self.mesh, self.specs)
        self.train_step = steps.jit_train_step(
            steps.make_train_step(self.module, self.optimizer, self.schedule,
                                  micro_batches=config.train.micro_batches,
                                  label_smoothing=config.optim.label_smoothing, dropout=config.train.dropout,
                                  mesh=self.mesh, rules=self.rules, frozen=frozen),
            self.mesh, self.specs)
        eval_module = EncoderDecoderModule(self.model.config, dtype=dtype, param_dtype=jnp.float32)
        self.eval_step = steps.jit_eval_step(steps.make_eval_step(eval_module, self.mesh, self.rules), self.mesh,
                                             pspecs)
        self._generate_fn = None

        ck = config.checkpoint
        self.ckpt_dir = os.path.join(self.out_dir, "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.ckpt_dir,
            options=ocp.CheckpointManagerOptions(max_to_keep=ck.keep, enable_async_checkpointing=ck.async_save,
                                                 cleanup_tmp_directories=True, create=True),
            item_names=("state", "data", "meta"))
        self.best: dict[str, Any] = {"value": None, "step": None}
        self.metrics = MetricsWriter(self.out_dir, enabled=self.is_main, tensorboard=config.train.tensorboard)
        self.resumed_from = self._restore() if restore else None

    # ------------------------------------------------------------------ helpers

    def info(self, message: str) -> None:
        if self.is_main:
            self._log(message)

    def _check_lengths(self):
        enc, dec = self.model.config.encoder_spec, self.model.config.decoder_spec
        if self.config.data.max_source_length > enc.max_length:
            raise RunConfigError(f"data.max_source_length {self.config.data.max_source_length} exceeds the "
                                 f"encoder's {enc.max_length} positions")
        if self.config.data.max_target_length > dec.max_length:
            raise RunConfigError(f"data.max_target_length {self.config.data.max_target_length} exceeds the "
                                 f"decoder's {dec.max_length} positions")

    def _abstract_state(self):
        shardings = named(self.mesh, self.specs)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state, shardings)

    def _restore(self) -> int | None:
        step = self.manager.latest_step()
        if step is None:
            return None
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(self._abstract_state()), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        self.state = restored["state"]
        self.loader.set_state(restored["data"])
        self.best = restored["meta"].get("best", self.best)
        self.info(f"resumed from checkpoint step {step} in {self.ckpt_dir}")
        return step

    def save(self, step: int) -> None:
        """Saves the state, the data position and the best-so-far (async; all processes take part)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state), data=ocp.args.JsonSave(self.loader.get_state()),
            meta=ocp.args.JsonSave({"best": self.best, "config": self.config.to_dict()})))

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
        gen = GenerationConfig.from_model_config(self.model.config).replace(
            num_beams=ev.num_beams, max_new_tokens=ev.max_new_tokens, length_penalty=ev.length_penalty,
            no_repeat_ngram_size=ev.no_repeat_ngram_size,
            early_stopping=True if ev.num_beams > 1 else False)
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        EncoderDecoderModel(self.model.config, params=params, generation_config=gen).save_pretrained(tmp)
        _copy_tokenizer(self.bundle.tokenizer_dir, tmp)
        if self.bundle.decoder_tokenizer_dir != self.bundle.tokenizer_dir:
            _copy_tokenizer(self.bundle.decoder_tokenizer_dir, os.path.join(tmp, "decoder_tokenizer"))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
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
            ev = self.config.eval
            mc = self.model.config
            gen = GenerationConfig.from_model_config(mc).replace(
                num_beams=ev.num_beams, max_new_tokens=ev.max_new_tokens, length_penalty=ev.length_penalty,
                no_repeat_ngram_size=ev.no_repeat_ngram_size, early_stopping=True if ev.num_beams > 1 else False,
                decoder_start_token_id=self.bundle.decoder_start_token_id, pad_token_id=self.bundle.pad_token_id,
                eos_token_id=self.bundle.eos_token_id)
            self._generate_fn = make_generate_fn(mc, gen)
        return self._generate_fn or None

    def evaluate(self, params=None, *, generate: bool | None = None) -> dict[str, float]:
        """Loss over the eval file (token-weighted mean) and, with generation on, ROUGE / BLEU."""
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
                texts = self.bundle.decoder_tokenizer.batch_decode(sequences)
                predictions.update({int(r): t for r, t, w in zip(rows, texts, weights) if w > 0})
        result = {"eval_loss": loss_sum / max(tokens, 1.0), "eval_tokens": tokens}
        if predictions:
            refs = [self.eval_pairs[i][1] for i in sorted(predictions)]
            hyps = [predictions[i] for i in sorted(predictions)]
            result.update(text_metrics(ev.metric, hyps, refs))
        return result

    def _eval_and_track(self, step: int) -> dict[str, float]:
        result = self.evaluate()
        self.metrics.write(step, result, prefix="")
        value = result.get(self.config.eval.best_metric)
        better = value is not None and (self.best["value"] is None or (
            value < self.best["value"] if self.config.eval.best_mode == "min" else value > self.best["value"]))
        if better:
            self.best = {"value": value, "step": step, "metric": self.config.eval.best_metric}
            self.export(os.path.join(self.out_dir, "best_model"))
        self.info(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items())
                  + (" (best)" if better else ""))
        return result

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        cfg = self.config
        total = cfg.train.num_steps
        start = int(jax.device_get(self.state.step))
        ck_every, ev_every, log_every = cfg.checkpoint.every, cfg.eval.every, cfg.train.log_every
        bar = None
        if self.is_main and cfg.train.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
        window: list[dict] = []
        pending = None  # (step, metrics) of the last dispatched step, read one step later
        last_time = time.perf_counter()
        last_eval: dict[str, float] = {}

        def consume(item):
            nonlocal last_time
            step_no, metrics = item
            host = jax.device_get(metrics)
            if not host["finite"]:
                self.manager.wait_until_finished()
                last = self.manager.latest_step()
                where = (f"the last good checkpoint is step {last} in {self.ckpt_dir}" if last is not None
                         else "no checkpoint was written yet")
                raise TrainingDivergedError(
                    f"loss is {float(host['loss'])} (grad norm {float(host['grad_norm'])}) at step {step_no}: "
                    f"training stopped; {where}")
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
                self.metrics.write(step_no, row, prefix="train/")
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", step_s=f"{row['step_time']:.3f}",
                                    tok_s=f"{row['tokens_per_s']:.0f}")
                elif not cfg.train.progress_bar:
                    self.info(f"step {step_no}: loss {row['loss']:.4f}, {row['step_time']:.3f} s/step, "
                              f"{row['tokens_per_s']:.0f} tokens/s")

        try:
            for step_no in range(start + 1, total + 1):
                local = next(self.loader)
                self.state, metrics = self.train_step(self.state, self.device_batch(local))
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
                    last_eval = self._eval_and_track(step_no)
                if do_save:
                    self.save(step_no)
            if pending is not None:
                consume(pending)
        finally:
            self.manager.wait_until_finished()
            if bar is not None:
                bar.close()
        final = None
        if cfg.checkpoint.export_final:
            final = self.export(os.path.join(self.out_dir, "final_model"))
        if cfg.train.plot:
            self.metrics.plot()
        self.metrics.close()
        self.manager.close()
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

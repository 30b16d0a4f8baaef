"""The training loop: data set-up, sharded state, the steps, checkpoints with exact resume, eval, metrics.

``Trainer(config).run()`` trains ``config.train.num_steps`` optimizer steps. Every process of a multi-host run
executes the same code; each reads only its rows of every batch, all take part in checkpoint saves, and
process 0 alone prints, writes metrics and exports models.

``output_dir`` and the data files may be bucket URLs (``gs://bucket/run``; see :mod:`jaxencdec.paths` for the
credentials): orbax writes the checkpoints there through tensorstore, ``final_model``/``best_model`` are uploaded
with ``config.json`` last, and ``metrics.jsonl``, the TensorBoard events and ``metrics.png`` are written in a
local temporary folder, what they gained appended to the bucket's objects after each metrics row by the metrics
writer's thread (see ``MetricsWriter``).

SIGTERM (a TPU VM's preemption notice) or Ctrl-C saves a checkpoint at the next step boundary and raises
``Preempted`` (:mod:`jaxencdec.train.preemption`). Resume: rerunning the same command restores the latest complete
checkpoint and continues bit-for-bit as if never stopped; which checkpoint is chosen, and what happens to damaged
or newer ones, is :mod:`jaxencdec.train.checkpoints`'s. The model and tokenizers come from
:mod:`jaxencdec.train.model_bundle`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxencdec import paths, storage
from jaxencdec.modeling import EncoderDecoderModel
from jaxencdec.models.encoder_decoder import fresh_params
from jaxencdec.parallel.mesh import initialize_distributed, make_mesh
from jaxencdec.parallel.shard import (check_sharding, global_batch, init_sharded, named, param_specs, put_sharded,
                                      to_host)
from jaxencdec.train import step as steps
from jaxencdec.train.batches import HOST_ONLY_KEYS, Prefetched
from jaxencdec.train.checkpoints import RunCheckpoints, check_resumable, check_schedule, run_folder
from jaxencdec.train.config import RunConfig, RunConfigError, check_lengths, check_shapes
from jaxencdec.train.data import DataError, open_pairs
from jaxencdec.train.metrics import MetricsWriter, metric_name, missing_metric_package, text_metrics
from jaxencdec.train.model_bundle import build_model
from jaxencdec.train.packing import token_efficiency
from jaxencdec.train.pipeline import Batches, eval_batches, training_batches
from jaxencdec.train.preemption import Preempted, StopSignals

logger = logging.getLogger("jaxencdec")


class TrainingDivergedError(RuntimeError):
    """The loss or the gradients became NaN or infinite."""


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


def _looks_local(path: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is a local path."""
    if paths.is_url(path):
        return False
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.exists(path)


# ---------------------------------------------------------------------- the trainer


class Trainer:
    """Everything one run needs, built in dependency order; ``run()`` trains.

    Attributes of interest: ``mesh``, ``specs`` (``TrainState`` of ``PartitionSpec``), ``state`` (the live
    sharded ``TrainState``), ``train_step`` (jitted; replaceable in tests), ``checkpoints`` (``RunCheckpoints``).

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
            check_resumable(self.ckpt_dir, config.checkpoint.resume_step, evaluate_only)
        if not evaluate_only and not paths.is_url(self.out_dir):  # a bucket has no folders to create
            os.makedirs(self.out_dir, exist_ok=True)
        self.mesh = make_mesh(config.mesh)
        self.rules = config.mesh.logical_rules
        self._report_devices()

        bundle = build_model(config)
        host_params = bundle.model.params  # placed on the devices below; the Trainer keeps no host copy
        self.model = EncoderDecoderModel(bundle.model.config, params={})  # its own: the bundle's stays as it is
        self.bundle = dataclasses.replace(bundle, model=self.model)

        data = config.data
        self.encoder = bundle.pair_encoder(data)
        check_lengths(config, self.model.config)
        self.loader = self._train_loader()
        self.eval_pairs = open_pairs(data, "eval") if config.eval.every >= 0 else None

        # Params: born sharded for a random init, else placed shard by shard from the host copy.
        logical = self.model.logical_axes()
        self.logical = logical
        # Checked here, before any compile: a pattern matching no parameter is a RunConfigError.
        frozen = steps.frozen_mask(logical, config.optim.freeze) if config.optim.freeze else None
        if host_params:
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), host_params)
            pspecs = param_specs(logical, shapes, self.mesh, self.rules)
            params = put_sharded(jax.tree.map(lambda x: np.asarray(x, np.float32), host_params), self.mesh, pspecs)
        else:
            init = partial(fresh_params, self.model.module)
            params, pspecs = init_sharded(init, jax.random.key(config.model.init_seed), logical, self.mesh,
                                          self.rules)
        del bundle, host_params  # the host copy is freed here unless another holder of the bundle keeps it
        self._report_parameters(params, frozen)
        self.sharding_report = check_sharding(params, pspecs, self.mesh, logical, self.rules)
        if not self.sharding_report.ok:
            raise RuntimeError(self.sharding_report.summary())
        param_split = self.mesh.shape["fsdp"] * self.mesh.shape["model"] > 1  # else replicas are the plan
        if self.sharding_report.unfitted or (param_split and self.sharding_report.replicated):
            self.info(self.sharding_report.summary())

        run_steps = steps.make_run_steps(config, self.model.config, params, pspecs, self.mesh, frozen)
        self.optimizer, self.specs = run_steps.optimizer, run_steps.specs
        self.state = steps.init_state(params, self.optimizer, config.train.seed, self.mesh, self.specs)
        self.train_step, self.eval_step = run_steps.train_step, run_steps.eval_step
        self._generate_fn = None
        self._batches = None  # while run() trains: Prefetched(self.loader)
        self._param_norm = jax.jit(optax.tree.norm)

        self.checkpoints = (RunCheckpoints(self.ckpt_dir, config.checkpoint, read_only=evaluate_only, info=self.info,
                                           warn=self.warn) if restore or not evaluate_only else None)
        self.best: dict[str, Any] = {"value": None, "step": None}
        self.param_norms: dict[int, float] = {}  # step -> global parameter norm: the start and every save
        self.resumed_from = self._restore() if restore else None
        self.metrics = MetricsWriter(self.out_dir, enabled=self.is_main and not evaluate_only,
                                     tensorboard=config.train.tensorboard,
                                     keep_through_step=int(jax.device_get(self.state.step)))

    # ------------------------------------------------------------------ helpers

    def _train_loader(self) -> Batches:
        """This process's rows of the training batches (padded, or packed with ``data.packing``)."""
        data = self.config.data
        return training_batches(open_pairs(data, "train"), self.encoder, self.config.train.batch_size,
                                jax.process_index(), jax.process_count(), seed=data.seed, shuffle=data.shuffle,
                                buckets=data.source_buckets, packed=data.packing, workers=data.workers)

    def info(self, message: str) -> None:
        """Prints ``message`` on process 0; above the progress bar while one is shown (``tqdm.write``'s way)."""
        if not self.is_main:
            return
        if self._bar is None:
            self._log(message)
            return
        with self._bar.external_write_mode():
            self._log(message)

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

    def close(self) -> None:
        """Waits for a save in flight and closes the checkpoint manager, the metrics writers and the data workers."""
        if self.checkpoints is not None:
            self.checkpoints.close()
        self.metrics.close()
        self.loader.close()

    def _abstract_state(self):
        shardings = named(self.mesh, self.specs)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state, shardings)

    def _restore(self) -> int | None:
        """Restores the newest checkpoint that restores, or ``checkpoint.resume_step``; returns its step (None:
        there is none). Newer checkpoints are moved aside unless ``evaluate_only``."""
        found = self.checkpoints.restore(self._abstract_state(), self.model.config.scan_layers,
                                         self.config.checkpoint.resume_step)
        if found is None:
            return None
        self.loader.set_state(found.data)  # a changed data file fails here, before anything is moved
        if not self.evaluate_only:
            check_schedule(found.step, found.meta.get("config", {}), self.config, self.ckpt_dir, self.warn)
            self.checkpoints.move_newer_aside(found)
        self.state = found.state
        best = found.meta.get("best", self.best)
        self.best = {**best, "metric": metric_name(best["metric"])} if "metric" in best else best
        self.param_norms = {int(k): v for k, v in found.meta.get("param_norms", {}).items()}
        self.info(f"{'evaluating' if self.evaluate_only else 'resumed from'} checkpoint step {found.step} in "
                  f"{self.ckpt_dir}")
        return found.step

    def save(self, step: int) -> None:
        """Saves the state, the data position, the best-so-far, the config and the parameter norms (async; all
        processes take part)."""
        self.param_norms[step] = float(self._param_norm(self.state.params))
        self.metrics.flush()  # the rows through this step are stored before its checkpoint exists
        meta = {"best": self.best, "config": self.config.to_dict(),
                "param_norms": {str(k): v for k, v in sorted(self.param_norms.items())}}
        position = (self._batches or self.loader).get_state()  # the batches read ahead do not count
        self.checkpoints.save(step, self.state, position, meta)

    def device_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return global_batch({k: v for k, v in local.items() if k not in HOST_ONLY_KEYS}, self.mesh)

    def host_params(self):
        """The params as full numpy arrays on every process (collective in multi-host runs)."""
        return to_host(self.state.params)

    def export(self, folder: str) -> str | None:
        """``save_pretrained`` of the current params, with the eval's decoding as ``generation_config.json``, and
        the tokenizers (``decoder_tokenizer/`` when it is another), the encoder's truncating inputs to
        ``data.max_source_length`` as training did (its ``model_max_length``)."""
        params = self.host_params()
        if not self.is_main:
            return None
        gen = self.config.eval.generation_config(self.model.config)
        tokenizer = copy.copy(self.bundle.tokenizer)
        tokenizer.model_max_length = self.config.data.max_source_length
        with storage.atomic_folder(folder) as staging:  # local: swapped in whole; bucket: uploaded, config.json last
            EncoderDecoderModel(self.model.config, params=params, generation_config=gen).save_pretrained(staging)
            # written from the loaded tokenizers, wherever they came from (a folder, a hub id, a bucket)
            tokenizer.save_pretrained(staging)
            if self.bundle.decoder_tokenizer is not self.bundle.tokenizer:
                self.bundle.decoder_tokenizer.save_pretrained(os.path.join(staging, "decoder_tokenizer"))
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
            self.eval_pairs = open_pairs(self.config.data, "eval")
        loader = eval_batches(self.eval_pairs, self.encoder, ev.batch_size, jax.process_index(), jax.process_count(),
                              buckets=self.config.data.source_buckets)
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
        pending = None  # (step, metrics, data seconds) of the last dispatched step, read one step later
        last_time = time.perf_counter()
        last_eval: dict[str, Any] = self.metrics.last_eval(start)  # a resumed run's last eval so far

        def consume(item):
            nonlocal last_time
            step_no, metrics, data_time = item
            host = {**jax.device_get(metrics), "data_time": data_time}
            if not host["finite"]:
                raise TrainingDivergedError(self.checkpoints.divergence_message(
                    f"loss is {float(host['loss'])} (grad norm {float(host['grad_norm'])}) at step {step_no}: "
                    f"training stopped", self.param_norms))
            window.append(host)
            if step_no % log_every == 0 or step_no == total:
                now = time.perf_counter()
                elapsed = now - last_time
                last_time = now
                row = {k: float(np.mean([w[k] for w in window])) for k in ("loss", "grad_norm", "learning_rate")}
                tok = sum(float(w["tokens"]) + float(w["source_tokens"]) for w in window)
                row["step_time"] = elapsed / len(window)
                row["tokens_per_s"] = tok / max(elapsed, 1e-9)
                row["token_efficiency"] = tok / sum(float(w["slots"]) for w in window)
                row["data_time"] = float(np.mean([w["data_time"] for w in window]))
                window.clear()
                self.metrics.write(step_no, {f"train/{k}": v for k, v in row.items()})
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", step_s=f"{row['step_time']:.3f}",
                                    tok_s=f"{row['tokens_per_s']:.0f}")
                elif not cfg.train.progress_bar:
                    self.info(f"step {step_no}: loss {row['loss']:.4f}, {row['step_time']:.3f} s/step, "
                              f"{row['tokens_per_s']:.0f} tokens/s")

        preempted = None
        self._batches = Prefetched(self.loader, self.device_batch)
        with StopSignals() as stop:
            try:
                for step_no in range(start + 1, total + 1):
                    data_start = time.perf_counter()
                    local, batch = next(self._batches)  # read and placed while the step before ran
                    data_time = time.perf_counter() - data_start  # what the step waited for its batch
                    if step_no == start + 1:
                        self.info("compiling the train step...")
                        compile_start = time.perf_counter()
                    self.state, metrics = self.train_step(self.state, batch)
                    if step_no == start + 1:  # jit compiles before it dispatches: the call's time is the compile's
                        self.info(f"train step compiled in {time.perf_counter() - compile_start:.1f} s")
                        self.info(f"token efficiency: {token_efficiency(local):.1%} of this process's token slots "
                                  f"hold tokens in the first batch (data.packing {str(cfg.data.packing).lower()}; "
                                  f"logged as train/token_efficiency)")
                        last_time = time.perf_counter()
                    if pending is not None:
                        consume(pending)
                    pending = (step_no, metrics, data_time)
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
                    if not is_last and stop.reached(step_no):  # SIGTERM/SIGINT: save this step, then stop
                        if pending is not None:
                            consume(pending)
                            pending = None
                        if not do_save:
                            self.save(step_no)
                        preempted = Preempted(stop.received, step_no, self.ckpt_dir)
                        break
                if pending is not None:
                    consume(pending)
            finally:
                self._batches.close()
                self._batches = None
                self.checkpoints.wait()
                if bar is not None:
                    bar.close()
                    self._bar = None
        if preempted is not None:
            self.close()  # the checkpoint is complete and the metrics flushed before the caller hears of it
            raise preempted
        final = None
        if cfg.checkpoint.export_final:
            final = self.export(os.path.join(self.out_dir, "final_model"))
        if cfg.train.plot:
            self.metrics.plot()
        self.close()
        return {"step": int(jax.device_get(self.state.step)), "resumed_from": self.resumed_from,
                "final_model": final, "best": self.best, "eval": last_eval}


def train(config: RunConfig) -> dict[str, Any]:
    """Builds a ``Trainer`` and runs it."""
    return Trainer(config).run()

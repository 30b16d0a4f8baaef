"""Optimizer, train state, the batch loss (the model's ``token_loss_sum``), and the jitted (sharded, donated)
train and eval steps.

Traced vs static: ``train_step(state, batch)`` and ``eval_step(params, batch)`` trace every array argument;
the module, optimizer, mesh, micro-batch count, label smoothing and dropout switch are closed over (static).
Shapes are static per bucket: a new source length compiles once, the same length never retraces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax import traverse_util
from jax.sharding import Mesh, PartitionSpec as P

from jaxencdec.config import EncoderDecoderConfig
from jaxencdec.models import layout
from jaxencdec.models.encoder_decoder import EncoderDecoderModule, counted_tokens, token_loss_sum
from jaxencdec.nn.layers import activation_constraints
from jaxencdec.parallel.mesh import BATCH_AXES, DEFAULT_RULES, Rules
from jaxencdec.parallel.shard import activation_constraint, batch_sharding, constrain, named, replicated
from jaxencdec.train.config import OptimConfig, RunConfig, RunConfigError

PyTree = Any
MODEL_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels")
# Packed rows (``data.packing``) add these int32 arrays: each token's sequence (0: padding) and its position in it.
PACKED_KEYS = ("encoder_segment_ids", "encoder_positions", "decoder_segment_ids", "decoder_positions")


def input_keys(packed: bool) -> tuple[str, ...]:
    """The arrays of a train or eval batch: ``MODEL_KEYS``, and ``PACKED_KEYS`` for packed rows."""
    return MODEL_KEYS + PACKED_KEYS if packed else MODEL_KEYS


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: PyTree  # float32 param tree
    opt_state: PyTree  # optax state (float32 moments, same layout as params)
    rng: jax.Array  # uint32 [2]: base dropout key; step s uses fold_in(rng, s)


# ---------------------------------------------------------------------- optimizer


def learning_rate_schedule(config: OptimConfig, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_steps``, then linear / cosine / constant to ``lr * end_lr_ratio``."""
    peak, end = config.learning_rate, config.learning_rate * config.end_lr_ratio
    decay_steps = max(num_steps - config.warmup_steps, 1)
    if config.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_lr_ratio)
    else:
        decay = optax.constant_schedule(peak)
    if not config.warmup_steps:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, config.warmup_steps), decay],
                                [config.warmup_steps])


def weight_decay_mask(params: PyTree, decay_embeddings: bool = True) -> PyTree:
    """True where AdamW decays: kernels (and embedding tables unless switched off); never biases or norms."""
    flat = traverse_util.flatten_dict(params)
    mask = {path: path[-1] == "kernel" or (decay_embeddings and path[-1] == "embedding") for path in flat}
    return traverse_util.unflatten_dict(mask)


def lr_multipliers(params: PyTree, patterns: Mapping[str, float]) -> PyTree:
    """Per-parameter learning-rate factors: the first regex of ``patterns`` that matches the ``/``-joined path
    (``re.search``) gives the factor, 1.0 otherwise."""
    def factor(path):
        name = "/".join(path)
        return next((f for p, f in patterns.items() if re.search(p, name)), 1.0)

    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: factor(path) for path in flat})


def frozen_mask(params: PyTree, patterns: Sequence[str]) -> PyTree:
    """True for the parameters whose ``/``-joined path matches one of ``patterns`` (``re.search``); a pattern
    that matches nothing is a ``RunConfigError`` (a typo would otherwise train everything)."""
    names = {path: "/".join(path) for path in traverse_util.flatten_dict(params)}
    unmatched = [p for p in patterns if not any(re.search(p, name) for name in names.values())]
    if unmatched:
        raise RunConfigError(f"optim.freeze: {unmatched} match no parameter (paths look like "
                             f"{next(iter(names.values()))!r})")
    return traverse_util.unflatten_dict({path: any(re.search(p, name) for p in patterns)
                                         for path, name in names.items()})


def stop_frozen_gradients(params: PyTree, frozen: PyTree | None) -> PyTree:
    """``params`` with ``lax.stop_gradient`` on the frozen leaves, so autodiff skips their backward pass."""
    if frozen is None:
        return params
    return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)


def make_optimizer(config: OptimConfig, num_steps: int, params: PyTree,
                   frozen: PyTree | None = None) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with ``learning_rate_schedule`` and masked weight decay, its step scaled
    per parameter group by ``config.lr_multipliers`` and zero for ``config.freeze`` (``frozen``: its
    ``frozen_mask`` when the caller already built it, else built here)."""
    parts = []
    if config.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(optax.adamw(learning_rate_schedule(config, num_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay,
                             mask=weight_decay_mask(params, config.decay_embeddings)))
    if config.lr_multipliers or config.freeze:
        factors = lr_multipliers(params, config.lr_multipliers)
        if config.freeze:
            mask = frozen if frozen is not None else frozen_mask(params, config.freeze)
            factors = jax.tree.map(lambda f, fixed: 0.0 if fixed else f, factors, mask)
        parts.append(optax.stateless(lambda updates, _: jax.tree.map(lambda u, f: u * f, updates, factors)))
    return optax.chain(*parts)


def state_specs(param_specs: PyTree, state_shapes: TrainState) -> TrainState:
    """``PartitionSpec``s for a whole ``TrainState``: optimizer moments follow their params, scalars replicate."""
    flat = traverse_util.flatten_dict(param_specs)

    def spec_for(path, leaf):
        names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        spec = flat.get(names)
        return spec if spec is not None and len(spec) == leaf.ndim else P()

    opt_specs = jax.tree_util.tree_map_with_path(spec_for, state_shapes.opt_state)
    return TrainState(step=P(), params=param_specs, opt_state=opt_specs, rng=P())


# ---------------------------------------------------------------------- loss


def _micro_split(batch: dict[str, jax.Array], micro_batches: int, mesh: Mesh | None) -> dict[str, jax.Array]:
    """``[B, ...] -> [M, B/M, ...]`` taking every M-th row, so each micro-batch stays spread over all data
    shards (a contiguous split would put micro-batch 0 on the first shards only)."""
    def split(x):
        x = x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, mesh, P(None, BATCH_AXES))

    return {k: split(v) for k, v in batch.items()}


def make_loss_fn(module, label_smoothing: float, mesh: Mesh | None, deterministic: bool,
                 rules: Rules = DEFAULT_RULES, frozen: PyTree | None = None):
    """``(params, batch, rng) -> (loss_sum, n_tokens)`` for one (micro-)batch; activations pinned by ``rules``;
    no gradient flows into the leaves where ``frozen`` (a bool tree like ``params``) is True."""
    pin = activation_constraint(mesh, rules)

    def loss_fn(params, batch, rng):
        params = stop_frozen_gradients(params, frozen)
        batch = {k: constrain(v, mesh, P(BATCH_AXES)) for k, v in batch.items()}
        packed = {k: batch[k] for k in PACKED_KEYS if k in batch}
        with activation_constraints(pin):
            out = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                               batch["decoder_input_ids"], batch["decoder_attention_mask"],
                               deterministic=deterministic, rngs=None if deterministic else {"dropout": rng},
                               **packed)
        # [batch, tgt_len, vocab]: vocab follows the LM head's split on `model`, rows the data split.
        logits = constrain(out.logits, mesh, P(BATCH_AXES, None, "model"))
        return token_loss_sum(logits, batch["labels"], label_smoothing)

    return loss_fn


# ---------------------------------------------------------------------- steps


def make_train_step(module, optimizer: optax.GradientTransformation, schedule: optax.Schedule, *,
                    micro_batches: int = 1, label_smoothing: float = 0.0, dropout: bool = True,
                    mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, frozen: PyTree | None = None,
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure train step ``(state, batch) -> (state, metrics)`` (not jitted; see ``jit_train_step``).

    ``batch``: int32 ``[B, src_len]`` / ``[B, tgt_len]`` arrays named as in ``input_keys`` (packed rows: with
    ``PACKED_KEYS``; other keys are dropped). The loss is the mean
    over all counted tokens of the whole batch, also with ``micro_batches > 1`` (each micro-batch's summed loss
    is divided by the whole batch's token count), so accumulation over M micro-batches equals one step on the
    full batch.
    Metrics (float32 scalars): loss, grad_norm, learning_rate, tokens (counted labels), source_tokens, slots
    (``B * (src_len + tgt_len)``: the token slots the tokens filled), finite (1.0 when loss and gradients
    are finite). ``frozen``: a bool tree like the params (``frozen_mask``); those leaves get no gradient (pair it
    with an optimizer built from the same ``OptimConfig.freeze``, which leaves them unchanged).
    """
    loss_fn = make_loss_fn(module, label_smoothing, mesh, deterministic=not dropout, rules=rules, frozen=frozen)

    def share_of_mean(params, batch, rng, denom):
        # Dividing inside the differentiated function scales the loss's cotangent, not every gradient leaf.
        return loss_fn(params, batch, rng)[0] / denom

    grad_fn = jax.value_and_grad(share_of_mean)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        step_rng = jax.random.fold_in(state.rng, state.step)
        batch = {k: batch[k] for k in MODEL_KEYS + PACKED_KEYS if k in batch}
        count = counted_tokens(batch["labels"])
        denom = jnp.maximum(count, 1.0)
        if micro_batches == 1:
            loss, grads = grad_fn(state.params, batch, step_rng, denom)
        else:
            def body(carry, xs):
                grads_acc, loss_acc = carry
                index, micro = xs
                loss, grads = grad_fn(state.params, micro, jax.random.fold_in(step_rng, index), denom)
                return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss), _ = jax.lax.scan(body, (zeros, jnp.float32(0)),
                                            (jnp.arange(micro_batches), _micro_split(batch, micro_batches, mesh)))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "learning_rate": jnp.asarray(schedule(state.step), jnp.float32), "tokens": count,
                   "source_tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32),
                   "slots": jnp.float32(batch["input_ids"].size + batch["labels"].size),
                   "finite": (jnp.isfinite(loss) & jnp.isfinite(grad_norm)).astype(jnp.float32)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def jit_train_step(train_step, mesh: Mesh, specs: TrainState, batch_keys=MODEL_KEYS):
    """``jax.jit`` with in/out shardings (state as ``specs``, batch split on data+fsdp, metrics replicated) and
    the state donated: its buffers are reused for the new state."""
    state_shardings = named(mesh, specs)
    batch_shardings = {k: batch_sharding(mesh) for k in batch_keys}
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))


def make_eval_step(module, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES):
    """``(params, batch) -> {"loss_sum", "tokens"}``: deterministic forward, no smoothing."""
    loss_fn = make_loss_fn(module, 0.0, mesh, deterministic=True, rules=rules)

    def eval_step(params, batch):
        loss_sum, count = loss_fn(params, batch, None)
        return {"loss_sum": loss_sum, "tokens": count}

    return eval_step


def jit_eval_step(eval_step, mesh: Mesh, param_specs: PyTree, batch_keys=MODEL_KEYS):
    return jax.jit(eval_step, in_shardings=(named(mesh, param_specs), {k: batch_sharding(mesh) for k in batch_keys}),
                   out_shardings=replicated(mesh))


def init_state(params: PyTree, optimizer: optax.GradientTransformation, seed: int, mesh: Mesh,
               specs: TrainState) -> TrainState:
    """A ``TrainState`` whose optimizer state is born with the params' shardings."""
    def make(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          rng=jax.random.PRNGKey(seed))

    return jax.jit(make, in_shardings=(named(mesh, specs.params),), out_shardings=named(mesh, specs),
                   donate_argnums=(0,))(params)


@dataclass(frozen=True)
class RunSteps:
    """A run's optimizer, schedule and jitted steps, as ``make_run_steps`` builds them."""

    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    specs: TrainState  # of PartitionSpec
    train_step: Callable  # jitted (state, batch) -> (state, metrics), the state donated
    eval_step: Callable  # jitted (params, batch) -> {"loss_sum", "tokens"}


def make_run_steps(config: RunConfig, model_config: EncoderDecoderConfig, params: PyTree, param_specs: PyTree,
                   mesh: Mesh, frozen: PyTree | None = None) -> RunSteps:
    """The train and eval steps of ``config`` (compute dtype, micro-batches, smoothing, dropout, rules) for the
    model ``model_config`` (its ``remat`` / ``scan_layers`` included), sharded as ``param_specs`` on ``mesh``.
    ``params``: arrays or ``jax.ShapeDtypeStruct``s (only their shapes are read). The Trainer runs them; ``jaxencdec
    compile`` compiles them for a TPU slice."""
    rules = config.mesh.logical_rules
    schedule = learning_rate_schedule(config.optim, config.train.num_steps)
    optimizer = make_optimizer(config.optim, config.train.num_steps, params, frozen)
    specs = state_specs(param_specs, state_shapes(params, optimizer))
    module = EncoderDecoderModule(model_config, dtype=config.model.dtype, param_dtype=jnp.float32)
    train_step = jit_train_step(
        make_train_step(module, optimizer, schedule, micro_batches=config.train.micro_batches,
                        label_smoothing=config.optim.label_smoothing, dropout=config.train.dropout, mesh=mesh,
                        rules=rules, frozen=frozen), mesh, specs, input_keys(config.data.packing))
    eval_step = jit_eval_step(make_eval_step(module, mesh, rules), mesh, param_specs)
    return RunSteps(optimizer, schedule, specs, train_step, eval_step)


def state_in_layout(state: TrainState, scanned: bool) -> TrainState:
    """``state`` (arrays or ``ShapeDtypeStruct``s) with its params and optimizer moments in the scanned or the
    unrolled layer layout (``models.layout``)."""
    return state.replace(params=layout.to_layout(state.params, scanned),
                         opt_state=layout.to_layout(state.opt_state, scanned))


def state_shapes(params_shapes: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
    return jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                               opt_state=optimizer.init(p), rng=jax.random.PRNGKey(0)),
                          params_shapes)

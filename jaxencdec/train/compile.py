"""Will it fit? A run's programs compiled ahead of time for a TPU slice, without the slice.

``compile_run(config, "v5e-64")`` builds the run's train step, eval step and eval generate exactly as ``Trainer``
builds them (``make_mesh`` over the slice's devices, ``param_specs``, ``state_specs``, ``jit_train_step`` with the
state donated, ``jit_eval_step``, ``make_generate_fn`` on sharded params), lowers them on
``jax.ShapeDtypeStruct`` inputs that carry their shardings, and compiles them with libtpu for that slice on
whatever machine runs it: nothing is allocated, no weights or data are read. The architecture comes from
``config.json`` alone (a hub id resolves from the local Hugging Face cache, offline with ``HF_HUB_OFFLINE=1``).
The result holds, per device, what XLA's ``memory_analysis`` reports (arguments: parameters, optimizer state and
the batch; temporaries; generated code; peak), the device's HBM, XLA's and the model's FLOPs, and the compile
times; ``format_report`` prints it as a table, ``does_not_fit_message`` says what to change when it does not fit.

On a machine without TPUs run with ``JAX_PLATFORMS=cpu`` (the ``jaxencdec compile`` command sets it), so that JAX
does not look for TPU chips; libtpu (``pip install "jax[tpu]"``, the same version as jax) does the compiling. One
process loads libtpu at a time unless ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` is set. Topology names and device memory:
``jaxencdec.parallel.topology``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from jaxencdec.parallel.topology import (GiB, OutOfMemory, Topology, device_memory, parse_out_of_memory,
                                         resolve_topology, topology_devices)
from jaxencdec.train.config import RunConfig, check_lengths, check_shapes

PROGRAMS = ("train", "eval", "generate")
# XLA's build option for the least execution-time optimization effort (jax's ``jax_exec_time_optimization_effort``):
# libtpu skips most of its backend optimization, which is where a TPU compile spends its time.
QUICK_COMPILE = {"exec_time_optimization_effort": -1.0}


# ---------------------------------------------------------------------- the report


@dataclass(frozen=True)
class ProgramReport:
    """One compiled program, per device (bytes; FLOPs of one call).

    shapes: the inputs in words; arguments_bytes: parameters, optimizer state and the batch; the others as
    ``jax.stages.Compiled.memory_analysis()`` names them (None where it does not say). xla_flops: XLA's
    ``cost_analysis()`` count (a loop's body counted once: micro-batches, scanned layers, decoding steps);
    model_flops: ``jaxencdec.train.flops`` over the devices (None for generate). error: the compile error when XLA
    ran out of memory (the memory fields then None, ``oom`` its figures).
    """

    name: str
    shapes: str
    compile_seconds: float
    arguments_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    code_bytes: int | None = None
    peak_bytes: int | None = None
    xla_flops: float | None = None
    model_flops: float | None = None
    error: str | None = None
    oom: OutOfMemory | None = None

    @property
    def total_bytes(self) -> int | None:
        """Arguments + outputs not aliased to a donated argument + temporaries + generated code."""
        parts = (self.arguments_bytes, self.output_bytes, self.alias_bytes, self.temp_bytes, self.code_bytes)
        if any(p is None for p in parts):
            return None
        return self.arguments_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def needed_bytes(self) -> int | None:
        """The figure to hold against HBM: XLA's peak, else the total, else what the out-of-memory error names."""
        if self.peak_bytes:
            return self.peak_bytes
        if self.total_bytes is not None:
            return self.total_bytes
        return self.oom.needed if self.oom else None


@dataclass(frozen=True)
class CompileReport:
    """What ``compile_run`` found: the target, the run's shape, and one ``ProgramReport`` per program compiled.

    capacity_bytes: HBM per device (None: unknown) and capacity_source where that figure comes from;
    skipped: ``program -> why`` for programs the run does not run (eval off, generation off); quick: compiled with
    XLA's least optimization effort (``compile_run(quick=True)``).
    """

    target: str
    device_kind: str
    num_devices: int
    capacity_bytes: int | None
    capacity_source: str
    mesh: dict[str, int]
    num_parameters: int
    compute_dtype: str
    remat: str
    scan_layers: bool
    programs: tuple[ProgramReport, ...]
    quick: bool = False
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def program(self, name: str) -> ProgramReport | None:
        return next((p for p in self.programs if p.name == name), None)

    def fits_program(self, program: ProgramReport) -> bool:
        if program.error:
            return False
        need = program.needed_bytes
        return self.capacity_bytes is None or need is None or need <= self.capacity_bytes

    def headroom(self, program: ProgramReport) -> float | None:
        """Percent of HBM left over at the program's peak (negative: short by that much); None if unknown."""
        need = program.needed_bytes
        if self.capacity_bytes is None or need is None:
            return None
        return 100.0 * (self.capacity_bytes - need) / self.capacity_bytes

    @property
    def fits(self) -> bool:
        return all(self.fits_program(p) for p in self.programs)

    @property
    def misfits(self) -> list[ProgramReport]:
        return [p for p in self.programs if not self.fits_program(p)]


# ---------------------------------------------------------------------- building the run's programs


def model_config(config: RunConfig):
    """The run's ``EncoderDecoderConfig`` from ``config.json`` files only (no weights, no tokenizer), with the
    run's token ids and ``model.remat`` / ``model.scan_layers`` applied; and notes on what was assumed."""
    from jaxencdec.checkpoint.hub import resolve_model_folder
    from jaxencdec.config import EncoderDecoderConfig, HFConfig
    from jaxencdec.train.model_bundle import token_ids

    m = config.model

    def read(source: str):
        return resolve_model_folder(source, ["config.json"]) / "config.json"

    if m.pretrained:
        mc = EncoderDecoderConfig.from_json_file(read(m.pretrained))
    elif m.encoder:
        mc = EncoderDecoderConfig.from_encoder_decoder_configs(
            HFConfig.from_json_file(read(m.encoder)), HFConfig.from_json_file(read(m.decoder)))
    else:
        mc = EncoderDecoderConfig.from_encoder_decoder_configs(
            HFConfig.from_dict(dict(m.encoder_config)), HFConfig.from_dict(dict(m.decoder_config)))
    # The Trainer takes ids the config leaves unset from the tokenizer; they are constants of the programs, so
    # a placeholder compiles the same code.
    ids = token_ids(m, mc, start=(mc.decoder.bos_token_id,), pad=(mc.decoder.pad_token_id,),
                    eos=(mc.decoder.eos_token_id,))
    unset = [k for k, v in ids.items() if v is None]
    notes = (f"{', '.join(unset)} not in the configs (the Trainer takes them from the tokenizer): 0 compiled in "
             f"their place",) if unset else ()
    mc = mc.replace(**{k: 0 if v is None else v for k, v in ids.items()})
    return mc.replace(remat=m.remat, scan_layers=m.scan_layers), notes


def _timed_compile(jitted, *args, quick: bool) -> tuple[Any, float, str | None]:
    """``(compiled or None, seconds, RESOURCE_EXHAUSTED message or None)``; other errors propagate."""
    start = time.perf_counter()
    try:
        compiled = jitted.lower(*args).compile(compiler_options=QUICK_COMPILE if quick else None)
    except Exception as error:
        if parse_out_of_memory(str(error)) is None:
            raise
        return None, time.perf_counter() - start, str(error)
    return compiled, time.perf_counter() - start, None


def _program_report(name: str, shapes: str, compiled, seconds: float, error: str | None,
                    model_flops: float | None) -> ProgramReport:
    if compiled is None:
        return ProgramReport(name, shapes, seconds, model_flops=model_flops, error=error,
                             oom=parse_out_of_memory(error))
    memory = compiled.memory_analysis()
    get = lambda field: None if memory is None else getattr(memory, field, None)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per device
    flops = cost.get("flops") if cost else None
    return ProgramReport(name, shapes, seconds, arguments_bytes=get("argument_size_in_bytes"),
                         output_bytes=get("output_size_in_bytes"), alias_bytes=get("alias_size_in_bytes"),
                         temp_bytes=get("temp_size_in_bytes"), code_bytes=get("generated_code_size_in_bytes"),
                         peak_bytes=get("peak_memory_in_bytes") or None,
                         xla_flops=float(flops) if flops is not None and flops >= 0 else None,
                         model_flops=model_flops)


def compile_run(config: RunConfig, topology: str | Topology | None = None, *,
                programs: Sequence[str] = PROGRAMS, log: Callable[[str], None] | None = None,
                quick: bool = False) -> CompileReport:
    """Compiles the run's programs for ``topology`` (a name for ``resolve_topology``; None: this machine's
    devices) and returns their per-device memory, FLOPs and compile times. Nothing is allocated.

    ``programs``: a subset of ``("train", "eval", "generate")``; eval is compiled when the run evaluates
    (``eval.every >= 0``), generate when it also generates (``eval.generate``), as in training. A program that
    runs out of memory at compile is reported (``ProgramReport.error``), not raised. ``log``: told before each
    compile. ``quick``: compile with XLA's least execution-time optimization effort (``QUICK_COMPILE``): on the
    shipped TPU configs 2-4x faster to compile, and the programs' memory differs from the full compile's, either
    way, by up to 4.4% of a v5e chip's HBM (README); training runs the full compile. Raises ``TopologyError``,
    ``TPUCompilerUnavailable``, ``RunConfigError`` (mesh or batch sizes that do not divide) and any other compile
    error.
    """
    import jax
    import jax.numpy as jnp

    from jaxencdec.generation.api import make_generate_fn
    from jaxencdec.modeling import EncoderDecoderModel
    from jaxencdec.models.encoder_decoder import abstract_params
    from jaxencdec.parallel.mesh import make_mesh
    from jaxencdec.parallel.shard import batch_sharding, named, param_specs, replicated
    from jaxencdec.train import step as steps
    from jaxencdec.train.flops import forward_flops, train_flops

    unknown = set(programs) - set(PROGRAMS)
    if unknown:
        raise ValueError(f"programs: unknown {sorted(unknown)}; choose from {PROGRAMS}")
    log = log or (lambda message: None)
    if topology is None:
        devices, family, target = jax.devices(), None, "local devices"
    else:
        topo = resolve_topology(topology) if isinstance(topology, str) else topology
        devices, family, target = topology_devices(topo), topo.family, topo.describe()
    shape = check_shapes(config, len(devices), len({d.process_index for d in devices}))
    mc, notes = model_config(config)
    check_lengths(config, mc)
    model = EncoderDecoderModel(mc, params={})
    mesh = make_mesh(config.mesh, devices=devices)
    rules = config.mesh.logical_rules

    # The Trainer's set-up (Trainer.__init__), on abstract values: float32 params, sharded by the rules.
    logical = model.logical_axes()
    shapes = abstract_params(model.module)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), shapes)
    pspecs = param_specs(logical, shapes, mesh, rules)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                          named(mesh, pspecs))
    num_parameters = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))

    data, train, ev = config.data, config.train, config.eval
    source, target_len = data.max_source_length, data.max_target_length

    def batch(rows: int, keys=steps.MODEL_KEYS) -> dict[str, jax.ShapeDtypeStruct]:
        sharding = batch_sharding(mesh)
        on_source = ("input_ids", "attention_mask", "encoder_segment_ids", "encoder_positions")
        return {k: jax.ShapeDtypeStruct((rows, source if k in on_source else target_len), jnp.int32,
                                        sharding=sharding) for k in keys}

    skipped = {}
    if ev.every < 0:
        skipped.update({"eval": "eval.every is -1", "generate": "eval.every is -1"})
    elif not ev.generate:
        skipped["generate"] = "eval.generate is false"
    wanted = [p for p in PROGRAMS if p in programs and p not in skipped]
    frozen = steps.frozen_mask(logical, config.optim.freeze) if config.optim.freeze else None
    run_steps = steps.make_run_steps(config, mc, shapes, pspecs, mesh, frozen)
    reports = []
    for name in wanted:
        if name == "train":
            state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                 steps.state_shapes(shapes, run_steps.optimizer), named(mesh, run_steps.specs))
            jitted, args = run_steps.train_step, (state, batch(train.batch_size, steps.input_keys(data.packing)))
            words = f"{train.batch_size} x ({source}+{target_len})" + (
                f", {train.micro_batches} micro-batches" if train.micro_batches > 1 else "")
            model_flops = train_flops(mc, train.batch_size, source, target_len) / len(devices)
        elif name == "eval":
            jitted, args = run_steps.eval_step, (params, batch(ev.batch_size))
            words = f"{ev.batch_size} x ({source}+{target_len})"
            model_flops = forward_flops(mc, ev.batch_size, source, target_len) / len(devices)
        else:  # as Trainer.generate_fn builds and calls it: params and the eval batch sharded
            jitted = make_generate_fn(mc, ev.generation_config(mc), dtype=config.model.dtype)
            inputs = batch(ev.batch_size)
            key = jax.eval_shape(lambda: jax.random.key(0))
            args = (params, inputs["input_ids"], inputs["attention_mask"],
                    jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(mesh)))
            words = f"{ev.batch_size} x {source}, {ev.num_beams} beam{'s' if ev.num_beams > 1 else ''}, " \
                    f"{ev.max_new_tokens} new"
            model_flops = None
        log(f"compiling {name} ({words}) for {target}...")
        compiled, seconds, error = _timed_compile(jitted, *args, quick=quick)
        reports.append(_program_report(name, words, compiled, seconds, error, model_flops))

    # cost_analysis counts the body of a loop once, however many times it runs.
    loops = [name for name, counted in (("generate's decoding loop", "generate" in wanted),
                                        ("train's micro-batch loop", train.micro_batches > 1 and "train" in wanted),
                                        ("the scanned layers (one layer per stack)", config.model.scan_layers))
             if counted]
    if loops:
        notes += (f"XLA's FLOPs count a loop's body once unless XLA unrolled the loop: {' and '.join(loops)}",)
    if quick:
        notes += ("compiled --quick (XLA's least optimization effort): memory and compile times are not those of the "
                  "programs training runs, whose memory differs by a few percent of HBM",)
    capacity, source_of = device_memory(devices[0], family)
    return CompileReport(
        target=target, device_kind=devices[0].device_kind, num_devices=len(devices), capacity_bytes=capacity,
        capacity_source=source_of, mesh=dict(zip(("data", "fsdp", "model"), shape)),
        num_parameters=num_parameters, compute_dtype=config.model.compute_dtype, remat=config.model.remat,
        scan_layers=config.model.scan_layers, programs=tuple(reports), skipped=skipped, notes=notes, quick=quick)


# ---------------------------------------------------------------------- printing


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def _gflop(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:,.0f}" if value >= 1e10 else f"{value / 1e9:.3g}"


def format_report(report: CompileReport) -> str:
    """A header and one table row per program (GiB and GFLOP per device), then skipped programs and notes."""
    capacity = "memory per device unknown" if report.capacity_bytes is None else (
        f"{report.capacity_bytes / GiB:.2f} GiB HBM each ({report.capacity_source})")
    mesh = " x ".join(f"{axis} {size}" for axis, size in report.mesh.items())
    lines = [f"{report.target}: {report.num_devices} x {report.device_kind}, {capacity}",
             f"mesh {mesh}; {report.num_parameters:,} parameters; compute {report.compute_dtype}, remat "
             f"{report.remat}, scan_layers {str(report.scan_layers).lower()}",
             "per device: args = parameters + optimizer state + batch; total = args + outputs not donated + temp + "
             "code; peak as XLA plans it",
             ""]
    header = ("program", "shapes", "args GiB", "temp GiB", "code GiB", "total GiB", "peak GiB", "headroom",
              "GFLOP XLA", "GFLOP model", "compile s")
    rows = []
    for p in report.programs:
        headroom = report.headroom(p)
        if p.error:
            need = f">= {_gib(p.oom.needed)}" if p.oom and p.oom.needed else "?"
            rows.append((p.name, p.shapes, "-", "-", "-", "-", need, "DOES NOT FIT", "-", _gflop(p.model_flops),
                         f"{p.compile_seconds:.1f}"))
            continue
        rows.append((p.name, p.shapes, _gib(p.arguments_bytes), _gib(p.temp_bytes), _gib(p.code_bytes),
                     _gib(p.total_bytes), _gib(p.peak_bytes),
                     "-" if headroom is None else f"{headroom:.0f}%" + ("" if headroom >= 0 else " DOES NOT FIT"),
                     _gflop(p.xla_flops), _gflop(p.model_flops), f"{p.compile_seconds:.1f}"))
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    left = {0, 1}
    for row in (header, *rows):
        lines.append("  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    for name, why in report.skipped.items():
        lines.append(f"{name}: not compiled ({why})")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def _shortfall(report: CompileReport, program: ProgramReport) -> float:
    """How many times the device's HBM the program asks for (at least 2: halving is the smallest step)."""
    need = program.oom.needed if program.error and program.oom and program.oom.needed else program.needed_bytes
    if not need or not report.capacity_bytes:
        return 2.0
    return max(need / report.capacity_bytes, 2.0)


def levers(report: CompileReport, config: RunConfig) -> list[str]:
    """The settings that would shrink the programs that do not fit, as ``--set`` overrides with why."""
    misfits = {p.name: p for p in report.misfits}
    out = []
    data, fsdp = report.mesh["data"], report.mesh["fsdp"]
    shards = data * fsdp
    if "train" in misfits:
        batch, micro = config.train.batch_size, config.train.micro_batches
        wanted = micro * 2 ** math.ceil(math.log2(_shortfall(report, misfits["train"])))
        fitting = [m for m in range(micro + 1, batch // shards + 1) if batch % (m * shards) == 0]
        more = next((m for m in fitting if m >= wanted), fitting[-1] if fitting else None)
        if more:
            out.append(f"--set train.micro_batches={more}: activations of {batch // more} rows at a time instead "
                       f"of {batch // micro} (gradients accumulate over them; the step is the same)")
        if config.model.remat != "full":
            out.append(f"--set model.remat=full (or dots_with_no_batch_dims_saveable): the backward pass recomputes "
                       f"activations instead of keeping them (now {config.model.remat})")
    if misfits.keys() & {"eval", "generate"}:
        worst = max(_shortfall(report, p) for name, p in misfits.items() if name != "train")
        rows = config.eval.batch_size // 2 ** math.ceil(math.log2(worst))
        rows = max(rows - rows % shards, shards)
        out.append(f"--set eval.batch_size={rows}: eval and generate take eval.batch_size rows at once (now "
                   f"{config.eval.batch_size})")
    if data >= 2:
        out.append(f"--set mesh.fsdp={fsdp * 2} --set mesh.data={data // 2}: parameters and optimizer state split "
                   f"{fsdp * 2} ways instead of {fsdp}")
    if config.model.compute_dtype != "bfloat16":
        out.append("--set model.compute_dtype=bfloat16: activations in half the bytes (params and optimizer state "
                   "stay float32)")
    return out


def does_not_fit_message(report: CompileReport, config: RunConfig) -> str:
    """Which programs do not fit, by how much and where the memory goes, and the levers (``levers``)."""
    capacity = "an unknown amount" if report.capacity_bytes is None else (
        f"{report.capacity_bytes / GiB:.2f} GiB ({report.capacity_source})")
    lines = []
    for p in report.misfits:
        if p.error:
            what = (f"XLA needs {p.oom.needed / GiB:.2f} GiB for {p.oom.what}" if p.oom and p.oom.needed
                    else "XLA ran out of memory")
            lines.append(f"{p.name} ({p.shapes}) does not fit {report.target}: {what}, a device has {capacity} "
                         f"[{p.oom.message if p.oom else p.error.splitlines()[0]}]")
        else:
            lines.append(f"{p.name} ({p.shapes}) does not fit {report.target}: it needs "
                         f"{p.needed_bytes / GiB:.2f} GiB per device at its peak, a device has {capacity} "
                         f"(arguments: parameters, optimizer state and batch {_gib(p.arguments_bytes)} GiB; "
                         f"temporaries {_gib(p.temp_bytes)} GiB)")
    options = levers(report, config)
    if options:
        lines.append("levers that shrink it:")
        lines += [f"  {option}" for option in options]
    return "\n".join(lines)

"""jaxencdec's programs compiled ahead of time for a TPU slice, and a reader for their optimized HLO.

As a script (``python tests/tpu_programs.py OUT_DIR [NAME ...]``, run by ``tests/test_tpu_programs.py`` in a
child process with ``JAX_PLATFORMS=cpu``): builds each program in ``PROGRAMS`` the way ``Trainer.__init__`` and
``Trainer.generate_fn`` build them (``make_mesh`` over the topology's devices, ``param_specs``, ``state_specs``,
``jit_train_step`` with the state donated; ``make_generate_fn`` on sharded params), lowers it on
``ShapeDtypeStruct``s that carry their shardings and compiles it with libtpu. For each it writes
``NAME.hlo`` (``compiled.as_text()``: the TPU HLO after optimization) and ``NAME.log`` (what the compiler wrote
to stderr during that compile: libtpu logs from C++, e.g. the SPMD partitioner's "Involuntary full
rematerialization", which no Python warning carries), and ``programs.json`` (per program: the mesh, the
parameters' global shapes and mesh specs, the compile seconds).

A child process, because ``JAX_PLATFORMS`` must be set before jax is imported and libtpu is loaded once per
process; its environment (``child_env``) sends libtpu's warnings to stderr and its log files to ``OUT_DIR``.

The reader (``Hlo``, ``collectives``, ``replica_groups``) knows the forms XLA:TPU gives collectives after
optimization: asynchronous collectives split over a start fusion and continuation fusions that each hold a copy
of the op (same ``channel_id``), reduce-scatters as an all-reduce followed by a per-partition ``dynamic-slice``
inside one fusion, several operands combined in one op, and replica groups printed as lists, iota lists
(``[2,2]<=[2,2]T(1,0)``) or mesh axes (``mesh['axis_0'=2,'axis_1'=2] {'axis_0'}``).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np

TOPOLOGY = "v5e:2x2"
MESH_AXES = ("data", "fsdp", "model")

# A tiny bert2bert whose parameter shapes all differ after the model split, so that a gradient's shape names
# its kernel (q/k/v share one): D 64, 4 heads of 16, MLP 256, vocabulary 512 (a multiple of 16), 96 positions.
BERT = {"model_type": "bert", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 96}
# ALBERT's shared layers: 4 layers in 2 groups of 2 (each group one parameter set), under 32-wide embeddings.
ALBERT = {**BERT, "model_type": "albert", "embedding_size": 32, "num_hidden_layers": 4, "num_hidden_groups": 2}
BATCH, SOURCE, TARGET = 8, 64, 32
MAX_NEW_TOKENS = 8


@dataclass(frozen=True)
class Program:
    """kind: "train", "generate" or "control" (a program the partitioner must fully rematerialize: it proves the
    log capture sees the message). mesh: (data, fsdp, model) over the devices of ``topology`` (jax's name).
    beams: generate's num_beams. encoder: the encoder's config (``BERT`` or ``ALBERT``)."""

    kind: str
    mesh: tuple[int, int, int] = (1, 2, 2)
    scan: bool = False
    beams: int = 1
    topology: str = TOPOLOGY
    encoder: str = "bert"


PROGRAMS = {
    "train": Program("train", mesh=(1, 4, 2), topology="v5e:2x4"),  # the v5e-64 configs' fsdp x model
    "train_scanned": Program("train", scan=True),
    "train_data_fsdp": Program("train", mesh=(2, 2, 1)),
    "greedy": Program("generate"),
    "beam": Program("generate", beams=4),
    "greedy_scanned": Program("generate", scan=True),
    "beam_scanned": Program("generate", scan=True, beams=4),
    "train_albert_scanned": Program("train", scan=True, encoder="albert"),
    "control": Program("control"),
}


def child_env(out_dir: str) -> dict[str, str]:
    """The environment of the compiling child: no TPU looked for, XLA's flags at their defaults and libtpu's as
    ``jaxencdec train`` sets them (``add_libtpu_flags``: the programs as a user gets them), libtpu's warnings on
    stderr and its log files under ``out_dir``."""
    from jaxencdec.parallel.libtpu_flags import add_libtpu_flags

    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(("JAX_", "TPU_")) or k in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")) or k == "JAX_ENABLE_X64"}
    add_libtpu_flags(env)
    env.update(JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_WORKER_HOSTNAMES="localhost",
               TPU_STDERR_LOG_LEVEL="1", TPU_LOG_DIR=os.path.join(out_dir, "tpu_logs"), PYTHONUNBUFFERED="1")
    return env


# ---------------------------------------------------------------------- building and compiling (in the child)


def model_config(scan: bool, encoder: str = "bert"):
    from jaxencdec.config import EncoderDecoderConfig, HFConfig

    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        HFConfig.from_dict({"bert": BERT, "albert": ALBERT}[encoder]), HFConfig.from_dict(BERT),
        decoder_start_token_id=1, pad_token_id=0, eos_token_id=2)
    # The scanned layout is trained with full remat, as a deep model would be.
    return config.replace(scan_layers=True, remat="full") if scan else config


def build(program: Program, devices) -> tuple[object, tuple, dict]:
    """``(jitted, abstract args, description)``: description holds the mesh and every parameter's global shape
    and mesh spec (``{"path/to/kernel": [shape, spec]}``, spec entries None, an axis name or a list of them)."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    if program.kind == "control":
        # A [6, 10] array split 4 ways on rows, then constrained to a 2 x 2 split the other way round: no
        # collective gets there, so the partitioner replicates it first and says so.
        mesh = Mesh(np.asarray(devices).reshape(2, 2), ("a", "b"))
        constrain = lambda x, spec: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        x = jax.ShapeDtypeStruct((6, 10), jnp.float32, sharding=NamedSharding(mesh, P()))
        jitted = jax.jit(lambda x: constrain(constrain(x * 2, P(("a", "b"))) * 3, P("b", "a")) + 1)
        return jitted, (x,), {"mesh": [2, 2], "params": {}}

    from jaxencdec.generation.api import make_generate_fn
    from jaxencdec.generation.config import GenerationConfig
    from jaxencdec.modeling import EncoderDecoderModel
    from jaxencdec.models.encoder_decoder import EncoderDecoderModule, abstract_params
    from jaxencdec.parallel.mesh import MeshConfig, make_mesh
    from jaxencdec.parallel.shard import batch_sharding, named, param_specs, replicated
    from jaxencdec.train import step as steps
    from jaxencdec.train.config import OptimConfig

    config = model_config(program.scan, program.encoder)
    data, fsdp, model_axis = program.mesh
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, model=model_axis), devices=devices)
    rules = MeshConfig().logical_rules
    model = EncoderDecoderModel(config, params={})
    logical = model.logical_axes()
    shapes = abstract_params(model.module)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), shapes)  # float32 params
    pspecs = param_specs(logical, shapes, mesh, rules)
    flat_shapes = traverse_util.flatten_dict(shapes, sep="/")
    flat_specs = traverse_util.flatten_dict(pspecs, sep="/")
    description = {"mesh": list(program.mesh),
                   "params": {path: [list(flat_shapes[path].shape), [list(e) if isinstance(e, tuple) else e
                                                                     for e in flat_specs[path]]]
                              for path in flat_shapes}}

    def sharded(tree, specs):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, named(mesh, specs))

    def batch(columns: dict[str, int]) -> dict[str, jax.ShapeDtypeStruct]:
        return {k: jax.ShapeDtypeStruct((BATCH, n), jnp.int32, sharding=batch_sharding(mesh))
                for k, n in columns.items()}

    if program.kind == "train":
        # As Trainer.__init__ builds it, with the run config's defaults (dropout on, AdamW, clipping).
        optim = OptimConfig()
        optimizer = steps.make_optimizer(optim, 100, shapes)
        state_shapes = steps.state_shapes(shapes, optimizer)
        specs = steps.state_specs(pspecs, state_shapes)
        module = EncoderDecoderModule(config, dtype=jnp.bfloat16, param_dtype=jnp.float32)
        jitted = steps.jit_train_step(
            steps.make_train_step(module, optimizer, steps.learning_rate_schedule(optim, 100), mesh=mesh,
                                  rules=rules), mesh, specs)
        columns = {k: SOURCE if k in ("input_ids", "attention_mask") else TARGET for k in steps.MODEL_KEYS}
        return jitted, (sharded(state_shapes, specs), batch(columns)), description

    generation = GenerationConfig.from_model_config(config).replace(
        num_beams=program.beams, max_new_tokens=MAX_NEW_TOKENS, early_stopping=program.beams > 1)
    jitted = make_generate_fn(config, generation, dtype=jnp.bfloat16)
    inputs = batch({"input_ids": SOURCE, "attention_mask": SOURCE})
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (sharded(shapes, pspecs), inputs["input_ids"], inputs["attention_mask"],
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(mesh)))
    description["cache_length"] = MAX_NEW_TOKENS  # max_length - 1: the last token is never fed back
    return jitted, args, description


def compile_all(out_dir: str, names: list[str]) -> None:
    """Compiles ``names`` one after the other, writing ``NAME.hlo``, ``NAME.log`` and ``programs.json``."""
    from jax.experimental import topologies

    described = {}
    for name in names:
        devices = topologies.get_topology_desc(topology_name=PROGRAMS[name].topology, platform="tpu").devices
        jitted, args, description = build(PROGRAMS[name], devices)
        lowered = jitted.lower(*args)
        log_path = os.path.join(out_dir, f"{name}.log")
        # libtpu writes from C++ straight to file descriptor 2: point it at this program's log for the compile.
        sys.stderr.flush()
        saved = os.dup(2)
        with open(log_path, "wb") as log:
            os.dup2(log.fileno(), 2)
            try:
                start = time.perf_counter()
                compiled = lowered.compile()
                seconds = time.perf_counter() - start
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
        with open(os.path.join(out_dir, f"{name}.hlo"), "w") as f:
            f.write(compiled.as_text())
        described[name] = {**dataclasses.asdict(PROGRAMS[name]), **description, "compile_seconds": round(seconds, 2)}
        print(f"{name}: compiled in {seconds:.1f} s", flush=True)
    with open(os.path.join(out_dir, "programs.json"), "w") as f:
        json.dump(described, f, indent=1)


# ---------------------------------------------------------------------- reading optimized HLO


_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_CALLED = re.compile(r"\b(calls|body|condition|to_apply)=%([\w.\-]+)")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all")


@dataclass(frozen=True)
class Instruction:
    name: str
    type: str  # as printed: "bf16[8,2,16]{2,1,0:T(8,128)(2,1)}" or a tuple "(f32[], f32[64])"
    op: str
    line: str
    computation: str

    @cached_property
    def operands(self) -> list[str]:
        """The operand names (the text up to the call's closing parenthesis)."""
        rest, depth = self.line.split(f" {self.op}(", 1)[1], 1
        for end, char in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                break
        return re.findall(r"%([\w.\-]+)", rest[:end])

    @property
    def arrays(self) -> list[tuple[str, tuple[int, ...]]]:
        """``[(dtype, shape)]`` of the result (one per tuple element)."""
        return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(self.type)]

    @property
    def op_name(self) -> str:
        found = re.search(r'op_name="([^"]*)"', self.line)
        return found.group(1) if found else ""

    @property
    def called(self) -> list[tuple[str, str]]:
        return _CALLED.findall(self.line)

    def attribute(self, name: str) -> str | None:
        found = re.search(rf"\b{name}=([^,\s]+)", self.line)
        return found.group(1) if found else None


class Hlo:
    """One optimized HLO module: its computations (name -> instructions), the entry, and the call graph."""

    def __init__(self, text: str):
        self.computations: dict[str, list[Instruction]] = {}
        self.entry = None
        current = None
        for line in text.splitlines():
            header = _COMPUTATION.match(line)
            if header:
                current = header.group(2)
                self.computations[current] = []
                if header.group(1):
                    self.entry = current
            elif line.startswith("}"):
                current = None
            elif current is not None:
                found = _INSTRUCTION.match(line)
                if found:
                    self.computations[current].append(Instruction(*found.groups()[:3], line, current))
        if self.entry is None:
            raise ValueError("no ENTRY computation in the HLO text")
        self.callers: dict[str, list[Instruction]] = collections.defaultdict(list)
        for instructions in self.computations.values():
            for instruction in instructions:
                for _, callee in instruction.called:
                    self.callers[callee].append(instruction)

    def instructions(self, computations=None):
        for name in self.computations if computations is None else computations:
            yield from self.computations[name]

    def by_name(self, computation: str) -> dict[str, Instruction]:
        return {i.name: i for i in self.computations[computation]}

    def reachable(self, root: str) -> set[str]:
        """``root`` and every computation it calls, transitively (fusions, nested loops, reductions)."""
        seen, stack = set(), [root]
        while stack:
            name = stack.pop()
            if name in seen or name not in self.computations:
                continue
            seen.add(name)
            stack.extend(callee for i in self.computations[name] for _, callee in i.called)
        return seen

    def loops(self, computation: str | None = None) -> list[Instruction]:
        """The ``while`` instructions of ``computation`` (default: the entry's, the top-level loops)."""
        return [i for i in self.computations[computation or self.entry] if i.op == "while"]

    def body(self, loop: Instruction) -> str:
        return loop.attribute("body").lstrip("%")

    def scope(self, computation: str) -> str:
        """The entry or the loop body (or condition) whose code ``computation`` is part of: fused computations
        and reductions belong to the computation that calls them."""
        seen = set()
        while computation != self.entry and computation not in seen:
            seen.add(computation)
            callers = self.callers.get(computation)
            if not callers:
                return computation
            caller = callers[0]
            if any(kind in ("body", "condition") and callee == computation for kind, callee in caller.called):
                return computation
            computation = caller.computation
        return computation


def _iota(dims: list[int], perm: list[int] | None) -> np.ndarray:
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    return ids.transpose(perm) if perm else ids


def replica_groups(line: str) -> frozenset[frozenset[int]] | None:
    """The replica groups of a collective as sets of device ids (None: ``{}``, all devices in one group).

    Raises ``ValueError`` for a notation not handled here, so that a new XLA cannot make a test pass by
    hiding its collectives."""
    found = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
    if found:
        groups = re.findall(r"\{([\d,]*)\}", found.group(1))
        return frozenset(frozenset(int(d) for d in g.split(",") if d) for g in groups) or None
    found = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if found:
        count, size = int(found.group(1)), int(found.group(2))
        ids = _iota([int(d) for d in found.group(3).split(",")],
                    [int(d) for d in found.group(4).split(",")] if found.group(4) else None)
        return frozenset(frozenset(row) for row in ids.reshape(count, size).tolist())
    found = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(([^)]*\)?)\))? \{([^}]*)\}", line)
    if found:
        # Devices are the mesh's device ids laid out over its axes; a group is the devices that differ only
        # along the named axes.
        axes = [(name.strip("'"), int(size)) for name, size in (a.split("=") for a in found.group(1).split(","))]
        names, sizes = [n for n, _ in axes], [s for _, s in axes]
        ids = np.arange(int(np.prod(sizes)))
        if found.group(2):
            layout = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", found.group(2))
            if not layout:
                raise ValueError(f"device_ids notation not handled: {found.group(2)}")
            ids = _iota([int(d) for d in layout.group(1).split(",")],
                        [int(d) for d in layout.group(2).split(",")] if layout.group(2) else None).ravel()
        grouped = [a.strip().strip("'") for a in found.group(3).split(",")]
        if any(":" in a for a in grouped):
            raise ValueError(f"sub-axis replica groups not handled: {found.group(3)}")
        along = [names.index(a) for a in grouped]
        rest = [i for i in range(len(names)) if i not in along]
        size = int(np.prod([sizes[i] for i in along]))
        rows = ids.reshape(sizes).transpose(rest + along).reshape(-1, size)
        return frozenset(frozenset(row) for row in rows.tolist())
    if "replica_groups={}" in line:
        return None
    raise ValueError(f"replica groups not understood: {line[:300]}")


def axis_groups(mesh_shape: tuple[int, ...], names=MESH_AXES) -> dict[frozenset, str]:
    """``replica groups -> axis name(s)`` ("fsdp", "data+fsdp"...) for every set of mesh axes larger than one
    device. Device (partition) ids follow the mesh's devices in row-major order."""
    ids = np.arange(int(np.prod(mesh_shape))).reshape(mesh_shape)
    out = {}
    for count in range(1, len(names) + 1):
        for along in itertools.combinations(range(len(names)), count):
            size = int(np.prod([mesh_shape[i] for i in along]))
            if size == 1:
                continue
            rest = [i for i in range(len(names)) if i not in along]
            groups = frozenset(frozenset(r) for r in ids.transpose(rest + list(along)).reshape(-1, size).tolist())
            out.setdefault(groups, "+".join(names[i] for i in along))
    out.setdefault(None, "+".join(n for n, s in zip(names, mesh_shape) if s > 1))  # all devices
    return out


@dataclass
class Collective:
    """One collective of the program (its asynchronous copies merged).

    kind: "all-gather", "reduce-scatter" (an all-reduce whose result each partition slices, or the op itself),
    "all-reduce", "all-to-all". axis: the mesh axes of its groups ("fsdp", "model", "data+fsdp"...).
    arrays: ``[(dtype, shape)]`` per operand, full size: an all-gather's results, a reduce-scatter's inputs.
    scope: the entry or the loop body it runs in. op_name: the jax operation it came from (for a combined
    collective, one of them)."""

    kind: str
    axis: str
    arrays: list[tuple[str, tuple[int, ...]]]
    scope: str
    op_name: str
    instruction: Instruction


def collectives(hlo: Hlo, mesh_shape: tuple[int, ...]) -> list[Collective]:
    """Every collective of ``hlo``, once: XLA:TPU's asynchronous collectives put a copy of the op in the fusion
    that starts it and in each fusion it overlaps with, all with one ``channel_id`` in one scope."""
    axes = axis_groups(mesh_shape)
    found: dict[tuple, Collective] = {}
    for computation, instructions in hlo.computations.items():
        users = collections.defaultdict(list)
        for instruction in instructions:
            for operand in instruction.operands:
                users[operand].append(instruction)
        for instruction in instructions:
            if instruction.op not in COLLECTIVES:
                continue
            groups = replica_groups(instruction.line)
            axis = axes.get(groups, str(sorted(map(sorted, groups))) if groups else "all")
            kind, arrays = instruction.op, instruction.arrays
            if kind == "all-reduce":
                # The partitioner's reduce-scatter: all-reduce, then each partition slices its part.
                after = users[instruction.name]
                after = after + [u for a in after if a.op == "get-tuple-element" for u in users[a.name]]
                if any(a.op == "dynamic-slice" for a in after):
                    kind = "reduce-scatter"
            elif kind == "reduce-scatter":
                types = {i.name: i for i in instructions}
                arrays = [a for o in instruction.operands for a in types[o].arrays]
            scope = hlo.scope(computation)
            key = (scope, instruction.attribute("channel_id") or instruction.name, instruction.op)
            if key not in found:
                found[key] = Collective(kind, axis, arrays, scope, instruction.op_name, instruction)
    return list(found.values())


def operand_sources(hlo: Hlo, instruction: Instruction) -> list[str]:
    """The jax op name of each operand of ``instruction``: of the instruction that computes it, looked up at the
    call site when the operand is a parameter of the fusion ``instruction`` sits in (XLA:TPU's reduce-scatter
    fusions)."""
    here = hlo.by_name(instruction.computation)
    out = []
    for name in instruction.operands:
        source = here[name]
        callers = hlo.callers.get(instruction.computation)
        if source.op == "parameter" and callers:
            caller = callers[0]
            index = int(source.line.split("parameter(")[1].split(")")[0])
            source = hlo.by_name(caller.computation)[caller.operands[index]]
        out.append(source.op_name)
    return out


def squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without size-1 dimensions (a scanned layer's slice keeps its leading 1 in some loops)."""
    return tuple(d for d in shape if d != 1)


if __name__ == "__main__":
    out, chosen = sys.argv[1], sys.argv[2:] or list(PROGRAMS)
    os.makedirs(out, exist_ok=True)
    compile_all(out, chosen)

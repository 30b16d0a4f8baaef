"""What the train step and generate look like compiled for TPU slices (v5e:2x2, v5e:2x4; ahead of time, no TPU).

One child process (``tests/tpu_programs.py``) compiles every program once with libtpu, under the libtpu flags
``jaxencdec train`` sets (``jaxencdec.parallel.libtpu_flags``), and writes its optimized HLO and the compiler's log;
the tests read those files. Programs (a tiny bert2bert, 2+2 layers, D 64, 4 heads,
MLP 256, vocabulary 512, bfloat16 compute on float32 params, batch 8 x (64 + 32)):

    train             the Trainer's train step, layers unrolled, no remat, on v5e:2x4 as mesh data 1 x fsdp 4 x
                      model 2 (the fsdp x model of the v5e-64 configs)
    train_scanned     scan_layers=True and remat="full", mesh data 1 x fsdp 2 x model 2
    train_data_fsdp   unrolled, mesh data 2 x fsdp 2 x model 1
    train_albert_scanned   as train_scanned with an ALBERT encoder: 4 layers sharing 2 parameter sets (groups)
    greedy, beam      make_generate_fn(dtype=bfloat16), 8 new tokens, 1 / 4 beams, mesh 1 x 2 x 2
    greedy_scanned, beam_scanned   the same with scanned layers
    control           a reshard the SPMD partitioner can only do by replicating (it logs that it did)

The child takes about 70 s on a quiet 2-core machine: the four train steps 9-13 s each, the four generates 1-2 s
each, the rest imports, tracing and libtpu's start.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

import tpu_programs as tp

pytestmark = pytest.mark.slow  # compiles nine programs for a TPU slice

TRAIN = ("train", "train_scanned", "train_data_fsdp")
GENERATE = ("greedy", "beam", "greedy_scanned", "beam_scanned")
SCANNED = ("train_scanned", "greedy_scanned", "beam_scanned")
SCANNED_TRAIN = ("train_scanned", "train_albert_scanned")

# Matmuls of one layer's forward pass: query, key, value, out, scores, probabilities x values, wi, wo; a
# decoder layer adds the same six for cross-attention. The LM head: transform, then logits (tied embeddings).
LAYER_MATMULS = {"encoder": 8, "decoder": 14}
HEAD_MATMULS = 2
# einsum_float32's products, the only ones allowed a float32 result: attention scores and logits.
FLOAT32_PRODUCTS = ("bhqd,bhkd->bhqk/", "...d,vd->...v/")


@dataclass
class Compiled:
    name: str
    hlo: tp.Hlo
    log: str  # what the compiler wrote to stderr while compiling this program
    description: dict  # mesh, params {path: [global shape, mesh spec]}, compile_seconds (programs.json)

    @property
    def mesh(self) -> tuple[int, ...]:
        return tuple(self.description["mesh"])

    @functools.cached_property
    def collectives(self) -> list[tp.Collective]:
        return tp.collectives(self.hlo, self.mesh)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """``name -> Compiled``; every program compiled once, in one child process."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip('libtpu is not installed (pip install "jaxencdec[tpu]")')
    out = tmp_path_factory.mktemp("tpu_programs")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tpu_programs.py")
    result = subprocess.run([sys.executable, script, str(out)], capture_output=True, text=True, timeout=600,
                            env=tp.child_env(str(out)))
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    described = json.loads((out / "programs.json").read_text())

    @functools.cache
    def get(name: str) -> Compiled:
        return Compiled(name, tp.Hlo((out / f"{name}.hlo").read_text()), (out / f"{name}.log").read_text(),
                        described[name])

    return get


# ---------------------------------------------------------------------- what the programs are made of


@dataclass(frozen=True)
class Kernel:
    """A layer's fsdp-split kernel. gathered: its shape once all-gathered over fsdp (split on model / data
    only), the shape of its gradient before the fsdp reduction; shard: its shape on one device. A scanned
    layout's leading layer axis is dropped: the loop handles one layer at a time."""

    stack: str  # encoder / decoder
    layer: int | None  # None when scanned
    block: str  # self_attention / cross_attention / mlp
    name: str  # query / key / value / out / wi / wo
    gathered: tuple[int, ...]
    shard: tuple[int, ...]

    @property
    def kind(self) -> str:
        return {"query": "qkv", "key": "qkv", "value": "qkv"}.get(self.name, self.name)

    def forms(self, shape: tuple[int, ...]) -> set[tuple[int, ...]]:
        """``shape`` (``gathered`` or ``shard``) as the program may hold it, size-1 dimensions dropped: as stored
        and, for an attention kernel, as the 2-D matrix attention multiplies (heads and head_dim flattened)."""
        if self.block == "mlp":
            return {tp.squeeze(shape)}
        flat = (shape[0], shape[1] * shape[2]) if self.kind == "qkv" else (shape[0] * shape[1], shape[2])
        return {tp.squeeze(shape), tp.squeeze(flat)}


_KERNEL_PATH = re.compile(r"^(encoder|decoder)/layers(?:_(\d+))?/(self_attention|cross_attention|mlp)/"
                          r"(query|key|value|out|wi|wo)/kernel$")


def layer_kernels(program: Compiled) -> list[Kernel]:
    sizes = dict(zip(tp.MESH_AXES, program.mesh))
    kernels = []
    for path, (shape, spec) in program.description["params"].items():
        found = _KERNEL_PATH.match(path)
        if not found:
            continue
        axes = [[] if entry is None else [entry] if isinstance(entry, str) else entry for entry in spec]
        assert any("fsdp" in a for a in axes), f"{path} is not split on fsdp: {spec}"
        gathered = [d // math.prod(sizes[a] for a in dim_axes if a != "fsdp") for d, dim_axes in zip(shape, axes)]
        shard = [d // math.prod(sizes[a] for a in dim_axes) for d, dim_axes in zip(shape, axes)]
        if found.group(2) is None:  # scanned: [layers, ...], the layer axis unsplit
            gathered, shard = gathered[1:], shard[1:]
        kernels.append(Kernel(found.group(1), None if found.group(2) is None else int(found.group(2)),
                              found.group(3), found.group(4), tuple(gathered), tuple(shard)))
    return kernels


_GATHERED = re.compile(r"(self_attention|cross_attention|mlp)(?:\.project_kv)?/(query|key|value|out|wi|wo)/"
                       r"dot_general")


def gathered_kernel(collective: tp.Collective) -> tuple[str, int | None, str, str] | None:
    """``(stack, layer, block, name)`` of the kernel an all-gather feeds, from its jax op name (layer None in a
    scanned loop, and for the decoder's cross-attention keys/values, which ``cross_kv`` projects for all
    layers at once); None for anything else."""
    name = collective.op_name
    kernel = _GATHERED.search(name)
    stack = re.search(r"(encoder|decoder)\.(?:_stack|cross_kv)", name)
    if not kernel or not stack:
        return None
    layer = re.search(r"/layers_(\d+)/", name)
    return stack.group(1), int(layer.group(1)) if layer else None, kernel.group(1), kernel.group(2)


def backward(collective: tp.Collective) -> bool:
    return "transpose(jvp(" in collective.op_name


def loop_role(loop: tp.Instruction) -> tuple[str, str]:
    """``(stack, "forward" | "backward")`` of a scanned train step's layer loop, from its jax op name."""
    stack = re.search(r"(encoder|decoder)\._stack/while$", loop.op_name)
    assert stack, f"not a layer loop: {loop.op_name}"
    return stack.group(1), "backward" if "transpose(jvp(" in loop.op_name else "forward"


def loop_scopes(program: Compiled, loop: tp.Instruction) -> set[str]:
    """The scopes (see ``Hlo.scope``) of ``loop``'s body: the body and any loop nested in it."""
    hlo = program.hlo
    return {hlo.scope(c) for c in hlo.reachable(hlo.body(loop))}


# ---------------------------------------------------------------------- reading HLO (no libtpu needed)


@pytest.mark.parametrize("text, groups", [
    ("replica_groups={{0,2},{1,3}}, dimensions={0}", {(0, 2), (1, 3)}),
    ("replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}", {(0, 2), (1, 3)}),
    ("replica_groups=[2,2]<=[4], to_apply=%add", {(0, 1), (2, 3)}),
    ("replica_groups=[1,4]<=[4], to_apply=%add", {(0, 1, 2, 3)}),
    # mesh axes: the devices laid out row-major over the axes (or as device_ids lists them); a group varies
    # only the named axes
    ("replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=2] {'axis_0'}, use_global_device_ids=true", {(0, 2), (1, 3)}),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_1'}, use_global_device_ids=true", {(0, 1), (2, 3)}),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_0'}, use_global_device_ids=true",
     {(0, 1), (2, 3)}),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_1'}, use_global_device_ids=true",
     {(0, 2), (1, 3)}),
    ("replica_groups=mesh['axis_0'=4] {'axis_0'}, to_apply=%add", {(0, 1, 2, 3)}),
])
def test_replica_group_notations(text, groups):
    """Checked against programs whose reduced mesh axis is known (a sum over a dimension split on that axis)."""
    assert tp.replica_groups(text) == frozenset(frozenset(g) for g in groups)


def test_unknown_replica_group_notations_raise():
    with pytest.raises(ValueError):
        tp.replica_groups("replica_groups=mesh['axis_0'=4] {'axis_0':(1)2}, to_apply=%add")
    with pytest.raises(ValueError):
        tp.replica_groups("all-reduce(%x), channel_id=1, to_apply=%add")


def test_axis_groups_name_the_mesh_axes():
    assert tp.axis_groups((1, 2, 2))[frozenset({frozenset({0, 2}), frozenset({1, 3})})] == "fsdp"
    assert tp.axis_groups((1, 2, 2))[frozenset({frozenset({0, 1}), frozenset({2, 3})})] == "model"
    assert tp.axis_groups((2, 2, 1))[frozenset({frozenset({0, 1}), frozenset({2, 3})})] == "fsdp"
    assert tp.axis_groups((2, 2, 1))[frozenset({frozenset({0, 2}), frozenset({1, 3})})] == "data"
    assert tp.axis_groups((2, 2, 1))[frozenset({frozenset({0, 1, 2, 3})})] == "data+fsdp"


# ---------------------------------------------------------------------- the compiler's log


def test_the_log_capture_sees_an_involuntary_rematerialization(compiled):
    """The control: without it a clean log below could mean the message no longer reaches us."""
    assert "involuntary full rematerialization" in compiled("control").log.lower(), compiled("control").log


@pytest.mark.parametrize("name", TRAIN + ("train_albert_scanned",) + GENERATE)
def test_no_involuntary_rematerialization(compiled, name):
    program = compiled(name)
    assert "involuntary full rematerialization" not in program.log.lower(), program.log


# ---------------------------------------------------------------------- bfloat16 matmuls


def matmuls(program: Compiled) -> list[tuple[tp.Instruction, list[str]]]:
    """Every dot and convolution (XLA:TPU writes most matmuls as convolutions) with its operands' dtypes."""
    out = []
    for instructions in program.hlo.computations.values():
        types = {i.name: i for i in instructions}
        for i in instructions:
            if i.op in ("dot", "convolution"):
                out.append((i, [types[o].arrays[0][0] for o in i.operands]))
    return out


def check_bfloat16(found: list[tuple[tp.Instruction, list[str]]]) -> None:
    for instruction, operands in found:
        assert operands == ["bf16", "bf16"], (operands, instruction.line[:300])
        dtype = instruction.arrays[0][0]
        assert dtype == "bf16" or (dtype == "f32" and any(p in instruction.op_name for p in FLOAT32_PRODUCTS)), \
            instruction.line[:300]


@pytest.mark.parametrize("name", ("train", "train_data_fsdp"))
def test_unrolled_train_matmuls_are_bfloat16(compiled, name):
    """Every matmul of the bf16 train step takes bf16 operands; float32 results only where einsum_float32 asks
    for them (attention scores and logits, via preferred_element_type).

    Found: 138 matmuls = 3 x 46: each of the 2 x 8 + 2 x 14 + 2 forward products once, and its two backward
    products (no remat: nothing is computed twice, nothing dropped); 7 with a float32 result (the scores of 2
    encoder + 4 decoder attentions, and the logits)."""
    found = matmuls(compiled(name))
    check_bfloat16(found)
    layers = tp.BERT["num_hidden_layers"]
    forward = layers * LAYER_MATMULS["encoder"] + layers * LAYER_MATMULS["decoder"] + HEAD_MATMULS
    assert len(found) == 3 * forward
    assert sum(i.arrays[0][0] == "f32" for i, _ in found) == layers + 2 * layers + 1


@pytest.mark.parametrize("name", SCANNED_TRAIN)
def test_scanned_train_matmuls_are_bfloat16_one_layer_per_loop(compiled, name):
    """Scanned with full remat: four loops, each body one layer. Found: forward bodies 8 (encoder) and 14
    (decoder) matmuls; backward bodies 3 x that (the layer recomputed, then its two backward products each);
    outside the loops the LM head's 2 forward and 4 backward products. ALBERT's encoder loops run over its groups
    (2 parameter sets for 4 layers): each body is one inner loop over a group's layers, whose body is the layer;
    its embedding projection adds 1 + 2 products outside the loops."""
    program = compiled(name)
    found = matmuls(program)
    check_bfloat16(found)
    hlo = program.hlo
    grouped = program.description["encoder"] == "albert"  # shared layers: a loop over groups, then layers
    expected = {hlo.entry: 3 * (HEAD_MATMULS + grouped)}
    for loop in hlo.loops():
        stack, direction = loop_role(loop)
        inner = hlo.loops(hlo.body(loop))
        assert len(inner) == (grouped and stack == "encoder"), (loop.op_name, [i.op_name for i in inner])
        expected[hlo.body(inner[0] if inner else loop)] = LAYER_MATMULS[stack] * (3 if direction == "backward" else 1)
    assert sorted(map(loop_role, hlo.loops())) == [(stack, direction) for stack in ("decoder", "encoder")
                                                   for direction in ("backward", "forward")]
    assert dict(collections.Counter(hlo.scope(i.computation) for i, _ in found)) == expected


@pytest.mark.parametrize("name", GENERATE)
def test_generate_matmuls_are_bfloat16(compiled, name):
    """Generate built with dtype=bfloat16. At least the encoder's layers are matmuls (XLA turns some of a
    one-token decoding step's products into multiply-and-reduce, so the count is a floor)."""
    program = compiled(name)
    found = matmuls(program)
    check_bfloat16(found)
    layers = 1 if name in SCANNED else tp.BERT["num_hidden_layers"]
    assert len(found) >= layers * LAYER_MATMULS["encoder"], len(found)


# ---------------------------------------------------------------------- FSDP


@pytest.mark.parametrize("name", ("train", "train_data_fsdp"))
def test_unrolled_layers_all_gather_each_kernel_over_fsdp(compiled, name):
    """ZeRO-3 as designed: every fsdp-split kernel of every layer is all-gathered over fsdp, in bf16, once for
    the forward pass and once more for the backward pass (the gathered copy is not kept in between).

    Found (both meshes): 64 kernel all-gathers = 2 x (2 x 6 encoder + 2 x 10 decoder kernels), each over the
    fsdp groups ({0,2,4,6},{1,3,5,7} on 1 x 4 x 2; {0,1},{2,3} on 2 x 2 x 1), each of the kernel's bf16 shape
    split on model only. (XLA:TPU runs each asynchronously, a copy of the op in every fusion it overlaps with:
    on 1 x 4 x 2, 265 all-gather instructions for 71 all-gathers.)"""
    program = compiled(name)
    kernels = {(k.stack, k.layer, k.block, k.name): k for k in layer_kernels(program)}

    def key(k: Kernel):  # the decoder's cross-attention keys/values are projected for all layers in one place
        return k.stack, None if k.block == "cross_attention" and k.name in ("key", "value") else k.layer, \
            k.block, k.name

    expected = collections.Counter(key(k) for k in kernels.values())
    passes = {"forward": collections.Counter(), "backward": collections.Counter()}
    for c in program.collectives:
        if c.kind != "all-gather" or gathered_kernel(c) is None:
            continue
        stack, layer, block, kernel_name = gathered_kernel(c)
        passes["backward" if backward(c) else "forward"][(stack, layer, block, kernel_name)] += 1
        kernel = next(k for k in kernels.values() if (k.stack, k.block, k.name) == (stack, block, kernel_name))
        assert c.axis == "fsdp" and len(c.arrays) == 1, (c.axis, c.arrays, c.op_name)
        assert c.arrays[0][0] == "bf16" and tp.squeeze(c.arrays[0][1]) in kernel.forms(kernel.gathered), \
            (c.arrays, c.op_name)
    assert passes["forward"] == expected
    assert passes["backward"] == expected


def test_scanned_layers_all_gather_each_kernel_in_the_loop(compiled):
    """Scanned: four layer loops (encoder / decoder x forward / backward), and a layer's all-gathers are in
    its loop's body, once per iteration: no layer kernel is gathered outside (which would gather every
    layer's weights at once).

    Found: the forward bodies gather each of their 6 / 10 kernels exactly once. The backward bodies (full
    remat) gather each once or twice: once for the recomputed forward and, for the attention kernels, again
    for the backward products (encoder body 10 gathers, decoder body 18; the MLP's gathered copy is reused)."""
    program = compiled("train_scanned")
    kernels = layer_kernels(program)
    hlo = program.hlo
    roles = {loop_role(loop): loop for loop in hlo.loops()}
    assert sorted(roles) == [(s, d) for s in ("decoder", "encoder") for d in ("backward", "forward")]
    gathers = [c for c in program.collectives if c.kind == "all-gather" and gathered_kernel(c)]
    assert not [c.op_name for c in gathers if c.scope == hlo.entry]
    for (stack, direction), loop in roles.items():
        expected = collections.Counter((k.block, k.name) for k in kernels if k.stack == stack)
        scopes = loop_scopes(program, loop)
        inside = [c for c in gathers if c.scope in scopes]
        found = collections.Counter(gathered_kernel(c)[2:] for c in inside)
        for c in inside:
            kernel = next(k for k in kernels if (k.stack, k.block, k.name) == (stack, *gathered_kernel(c)[2:]))
            assert gathered_kernel(c)[0] == stack and c.axis == "fsdp" and len(c.arrays) == 1, (c.op_name, c.axis)
            assert c.arrays[0][0] == "bf16" and tp.squeeze(c.arrays[0][1]) in kernel.forms(kernel.gathered), \
                (c.arrays, c.op_name)
        if direction == "forward":
            assert found == expected, (stack, found)
        else:
            assert set(found) == set(expected) and all(1 <= n <= 2 for n in found.values()), (stack, found)


def gradient_reductions(program: Compiled, kernels: list[Kernel], scopes: set[str]) -> dict[str, collections.Counter]:
    """``axis -> Counter of (kind, size, kernel kind)``: every bf16 reduction in ``scopes`` of a kernel's gradient:
    an operand computed by a kernel's dot_general under ``transpose(jvp(`` and shaped like that kernel
    ("full": its gathered shape, before the fsdp reduction; "shard": a device's shard, after it). The same op
    also computes the gradient of the product's input, an activation, which has neither shape."""
    out = collections.defaultdict(collections.Counter)
    for c in program.collectives:
        if c.kind not in ("reduce-scatter", "all-reduce") or c.scope not in scopes:
            continue
        for (dtype, shape), source in zip(c.arrays, tp.operand_sources(program.hlo, c.instruction)):
            found = _GATHERED.search(source)
            if dtype != "bf16" or not found or "transpose(jvp(" not in source:
                continue
            kernel = next(k for k in kernels if (k.block, k.name) == found.groups())
            for size, kernel_shape in (("full", kernel.gathered), ("shard", kernel.shard)):
                if tp.squeeze(shape) in kernel.forms(kernel_shape):
                    out[c.axis][(c.kind, size, kernel.kind)] += 1
                    break
    return out


def reduction_scopes(program: Compiled) -> dict[str | None, tuple[set[str], list[Kernel]]]:
    """Where a layer's gradients are reduced and which kernels': the whole program for an unrolled step; each
    backward loop body for a scanned one (its stack's kernels, once per iteration)."""
    kernels, hlo = layer_kernels(program), program.hlo
    if not hlo.loops():
        return {None: (set(hlo.computations), kernels)}
    out = {}
    for loop in hlo.loops():
        stack, direction = loop_role(loop)
        if direction == "backward":
            out[stack] = (loop_scopes(program, loop), [k for k in kernels if k.stack == stack])
    return out


@pytest.mark.parametrize("name", TRAIN)
def test_every_layer_gradient_is_reduced_over_fsdp_once(compiled, name):
    """Each layer kernel's gradient is summed over the fsdp groups exactly once (reduce-scatter or all-reduce,
    in bf16), never over the model axis; with a data axis, over data once more, on its fsdp shard (after the
    scatter, the cheap order), and never over data and fsdp together. Scanned: in its backward loop's body,
    once per layer, and nowhere else.

    Found: 1 x 4 x 2 unrolled, 32 reductions, all reduce-scatters (8 MLP, 18 query/key/value, 6 out kernels);
    scanned (1 x 2 x 2), per backward body: encoder 6 (2 + 4), decoder 10 (2 + 8); 2 x 2 x 1 the same 32 over
    fsdp, then 32 all-reduces over data, each of a device's fsdp shard."""
    program = compiled(name)
    data = program.mesh[0]
    every_scope = set()
    for stack, (scopes, kernels) in reduction_scopes(program).items():
        every_scope |= scopes
        expected = collections.Counter(k.kind for k in kernels)
        found = gradient_reductions(program, kernels, scopes)
        over_fsdp = collections.Counter()
        for (kind, size, kernel_kind), n in found.pop("fsdp", {}).items():
            assert size == "full", (kind, size, kernel_kind)
            over_fsdp[kernel_kind] += n
        assert over_fsdp == expected, (stack, over_fsdp)
        if data > 1:
            over_data = collections.Counter()
            for (kind, size, kernel_kind), n in found.pop("data", {}).items():
                assert (kind, size) == ("all-reduce", "shard"), (kind, size, kernel_kind)
                over_data[kernel_kind] += n
            assert over_data == expected, (stack, over_data)
        assert not found, (stack, dict(found))  # model, data+fsdp, fsdp+model: none
    if program.hlo.loops():  # scanned: nothing of the layers' gradients outside their loops
        outside = set(program.hlo.computations) - every_scope
        assert not gradient_reductions(program, layer_kernels(program), outside)


@pytest.mark.parametrize("name", TRAIN)
def test_mlp_gradients_are_reduce_scattered(compiled, name):
    """wi and wo gradients: one reduce-scatter over fsdp per layer (an all-reduce then a slice per partition,
    in one fusion: XLA:TPU's form), each device receiving only its shard."""
    program = compiled(name)
    for stack, (scopes, kernels) in reduction_scopes(program).items():
        expected = collections.Counter(k.kind for k in kernels if k.block == "mlp")
        found = gradient_reductions(program, kernels, scopes)["fsdp"]
        scattered = collections.Counter({kind: n for (op, _, kind), n in found.items()
                                         if op == "reduce-scatter" and kind in ("wi", "wo")})
        assert scattered == expected, (stack, found)


@pytest.mark.parametrize("name, kind", [(name, "qkv") for name in TRAIN] + [
    (name, "out") for name in TRAIN])
def test_attention_gradients_are_reduce_scattered(compiled, name, kind):
    """FSDP as designed: the query, key and value gradients (``kind`` "qkv") and the out gradients reduce-scattered
    over fsdp, like the MLP's. The projections multiply their kernels as 2-D matrices (``HeadsProjection``): a 3-D
    contraction gives the query/key/value gradients a layout that XLA:TPU all-reduces instead. The out gradient's
    fsdp dimension is its minor-most one: without ``jaxencdec.parallel.libtpu_flags`` (libtpu 0.0.42.1's defaults),
    on 1 x 2 x 2 (train_scanned) libtpu all-reduces it at full size and keeps a slice."""
    program = compiled(name)
    for stack, (scopes, kernels) in reduction_scopes(program).items():
        expected = collections.Counter(k.kind for k in kernels if k.kind == kind)
        found = gradient_reductions(program, kernels, scopes)["fsdp"]
        scattered = collections.Counter({k: n for (op, _, k), n in found.items()
                                         if op == "reduce-scatter" and k == kind})
        assert scattered == expected, (stack, found)


# ---------------------------------------------------------------------- generate


def search_loop(program: Compiled) -> tp.Instruction:
    """The decoding loop: the top-level loop whose body writes the KV cache (a scanned program also has the
    encoder's layer loop at the top level)."""
    loops = program.hlo.loops()
    writing = [loop for loop in loops if cache_writes(program, loop)]
    assert len(writing) == 1, [loop.op_name for loop in loops]
    return writing[0]


def head_dim() -> int:
    return tp.BERT["hidden_size"] // tp.BERT["num_attention_heads"]


def is_cache(array: tuple[str, tuple[int, ...]]) -> bool:
    """A KV cache buffer or view of one: bf16 ``[..., batch, heads, (slots,) positions, head_dim]``."""
    dtype, shape = array
    return dtype == "bf16" and len(shape) >= 4 and shape[-1] == head_dim()


def cache_writes(program: Compiled, loop: tp.Instruction) -> list[tp.Instruction]:
    """The dynamic-update-slices into cache buffers anywhere in ``loop``'s body (fusions and nested loops)."""
    return [i for i in program.hlo.instructions(program.hlo.reachable(program.hlo.body(loop)))
            if i.op == "dynamic-update-slice" and is_cache(i.arrays[0])]


@pytest.mark.parametrize("name", GENERATE)
def test_generate_is_one_search_loop(compiled, name):
    """Generate compiles to one decoding loop (greedy and beam search alike) that holds every cache write;
    besides it only the scanned encoder's layer loop runs at the top level (found: 1 loop unrolled, 2
    scanned)."""
    program = compiled(name)
    loop = search_loop(program)
    assert loop.op_name.endswith("jit(generate_fn)/while"), loop.op_name
    others = [other.op_name for other in program.hlo.loops() if other is not loop]
    if name in SCANNED:
        assert len(others) == 1 and others[0].endswith("encoder._stack/while"), others
    else:
        assert not others, others


def source_of(program: Compiled, instruction: tp.Instruction, operand: int) -> tp.Instruction:
    """The instruction that produces ``instruction``'s ``operand``-th operand, seen from outside any fusion:
    a fused computation's parameter is followed to the fusion's operand, and bitcasts are looked through."""
    hlo = program.hlo
    while True:
        produced = hlo.by_name(instruction.computation)[instruction.operands[operand]]
        if produced.op == "bitcast":
            instruction, operand = produced, 0
            continue
        if produced.op == "parameter" and hlo.callers.get(produced.computation):
            caller = hlo.callers[produced.computation][0]
            if caller.op == "fusion":
                instruction, operand = caller, int(re.search(r"parameter\((\d+)\)", produced.line).group(1))
                continue
        return produced


@pytest.mark.parametrize("name", GENERATE)
def test_kv_cache_is_written_in_place(compiled, name):
    """Each step writes one position per layer into the loop-carried cache: per decoder layer one
    dynamic-update-slice for keys and one for values, each of one position (all rows, heads and beam slots)
    into a buffer that comes straight from a loop's state (no copy, no slice of something larger).

    Found unrolled: 4 writes of [8, 2, 1, 16] into [8, 2, 8, 16] (greedy; beams: [8, 2, 4, 1, 16] into the beams'
    shared [8, 2, 4, 8, 16]), each into a get-tuple-element of the decoding loop's state: the whole batch of 8 on
    each device (generate splits the batch on data only; fsdp splits the weights' embed side, and each step
    all-reduces activations over it), 2 of the 4 heads (model). Scanned: 2 writes in the layer loop's body, of
    one position of one layer into the cache of both layers ([2, 8, 2, 8, 16]), carried by the layer loop."""
    program = compiled(name)
    scanned = name in SCANNED
    layers = tp.BERT["num_hidden_layers"]
    writes = cache_writes(program, search_loop(program))
    assert len(writes) == 2 * (1 if scanned else layers), [w.arrays for w in writes]
    for write in writes:
        (_, buffer_shape), = write.arrays
        update = program.hlo.by_name(write.computation)[write.operands[1]]
        (_, update_shape), = update.arrays
        positions = program.description["cache_length"]
        stacked = layers if scanned else 1
        assert math.prod(update_shape) * positions * stacked == math.prod(buffer_shape), (update_shape, buffer_shape)
        source = source_of(program, write, 0)
        state = next(i for i in program.hlo.computations[source.computation] if i.op == "parameter")
        assert source.op == "get-tuple-element" and source.operands == [state.name], source.line[:300]


@pytest.mark.parametrize("name", GENERATE)
def test_no_copy_of_a_cache_buffer_in_the_search_loop(compiled, name):
    """No copy (synchronous or asynchronous) of a bf16 array as large as a layer's cache buffer, whatever its
    shape, anywhere in the decoding loop: per step only the new position moves (and the cross-attention
    keys/values, larger still, stay where they are). Found: the largest bf16 copy in the loop has 256
    elements (greedy; a layer's cache 2,048) / 1,024 (beams; a layer's cache 8,192)."""
    program = compiled(name)
    loop = search_loop(program)
    smallest = min(math.prod(w.arrays[0][1]) for w in cache_writes(program, loop))
    copies = [i for i in program.hlo.instructions(program.hlo.reachable(program.hlo.body(loop)))
              if i.op in ("copy", "copy-start") and any(dtype == "bf16" and math.prod(shape) >= smallest
                                                         for dtype, shape in i.arrays)]
    assert not copies, [c.line[:200] for c in copies]

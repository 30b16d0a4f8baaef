"""Sharding on 8 host CPU devices (in a child process, so the rest of the suite keeps one device).

One train step on a data=2 x fsdp=2 x model=2 mesh must give the loss and params of the same step on one
device, and every weight must be split exactly as the rules table says; for a BERT decoder and for a Llama one
(grouped-query attention: its 2 key/value heads split over ``model`` like the 4 query heads).
"""

import json
import subprocess
import sys
import textwrap

import pytest

import testing

pytestmark = pytest.mark.slow  # a child process of 8 devices

WORKER = textwrap.dedent(r"""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from flax import traverse_util
    from jaxencdec.config import EncoderDecoderConfig, HFConfig
    from jaxencdec.modeling import EncoderDecoderModel
    from jaxencdec.parallel.mesh import MeshConfig, make_mesh
    from jaxencdec.parallel import shard
    import testing
    from jaxencdec.train import step as st
    from jaxencdec.train.config import OptimConfig

    assert jax.device_count() == 8, jax.devices()
    vocab = 96
    decoder = getattr(testing, f"tiny_{sys.argv[1]}")(vocab)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        HFConfig.from_dict(testing.tiny_bert(vocab)), HFConfig.from_dict(decoder),
        decoder_start_token_id=2, pad_token_id=0)
    model = EncoderDecoderModel(config, seed=0)
    host_params = jax.tree.map(np.asarray, model.params)
    logical = model.logical_axes()
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(5, vocab, (8, 12)), "attention_mask": np.ones((8, 12)),
             "decoder_input_ids": rng.integers(5, vocab, (8, 6)), "decoder_attention_mask": np.ones((8, 6)),
             "labels": rng.integers(5, vocab, (8, 6))}
    batch = {k: v.astype(np.int32) for k, v in batch.items()}
    batch["attention_mask"][:3, 9:] = 0
    batch["labels"][:2, 4:] = -100

    def one_step(mesh):
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host_params)
        specs = shard.param_specs(logical, shapes, mesh)
        params = shard.put_sharded(host_params, mesh, specs)
        tx = st.make_optimizer(optim, 10, params)
        sspecs = st.state_specs(specs, st.state_shapes(params, tx))
        state = st.init_state(params, tx, 0, mesh, sspecs)
        fn = st.jit_train_step(st.make_train_step(model.module, tx, st.learning_rate_schedule(optim, 10),
                                                  dropout=True, mesh=mesh), mesh, sspecs)
        state, metrics = fn(state, shard.global_batch(batch, mesh))
        return state, metrics, specs

    one = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    eight = make_mesh(MeshConfig(2, 2, 2))
    s1, m1, _ = one_step(one)
    s8, m8, specs8 = one_step(eight)

    p1 = traverse_util.flatten_dict(jax.tree.map(np.asarray, s1.params), sep="/")
    p8 = traverse_util.flatten_dict(jax.tree.map(np.asarray, s8.params), sep="/")
    live = traverse_util.flatten_dict(s8.params, sep="/")
    mu = traverse_util.flatten_dict(s8.opt_state[1][0].mu, sep="/")
    out = {
        "loss": [float(m1["loss"]), float(m8["loss"])],
        "max_param_diff": max(float(np.max(np.abs(p1[k] - p8[k]))) for k in p1),
        "moved": max(float(np.max(np.abs(p1[k] - np.asarray(traverse_util.flatten_dict(host_params, sep="/")[k]))))
                     for k in p1),
        "specs": {k: [None if e is None else e for e in v.sharding.spec] for k, v in live.items()},
        "shard_shapes": {k: list(v.addressable_shards[0].data.shape) for k, v in live.items()},
        "shapes": {k: list(v.shape) for k, v in live.items()},
        "mu_specs": {k: [None if e is None else e for e in v.sharding.spec] for k, v in mu.items()},
        "report_ok": shard.check_sharding(s8.params, specs8, eight, logical).ok,
        "report_unfitted": shard.check_sharding(s8.params, specs8, eight, logical).unfitted,
    }
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module", params=["bert", "llama"])
def result(request, tmp_path_factory):
    """What the worker measured, with a BERT decoder or a Llama one (the encoder is BERT's)."""
    script = tmp_path_factory.mktemp("sharding") / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run([sys.executable, str(script), request.param], env=testing.subprocess_env(8),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return {**json.loads(line[len("RESULT"):]), "stderr": proc.stderr, "decoder": request.param}


def test_one_step_on_2x2x2_mesh_equals_one_device(result):
    loss1, loss8 = result["loss"]
    assert abs(loss1 - loss8) <= 1e-5
    assert result["moved"] > 1e-4  # the step did change the params
    assert result["max_param_diff"] <= 1e-5


# (path suffix, expected mesh spec) straight from the rules table: heads/mlp/vocab/hidden -> model,
# embed -> fsdp, kv/positions/norm -> replicated.
EXPECTED = {
    "self_attention/query/kernel": ["fsdp", "model", None],
    "self_attention/key/bias": ["model", None],
    "self_attention/out/kernel": ["model", None, "fsdp"],
    "self_attention/out/bias": ["fsdp"],
    "cross_attention/value/kernel": ["fsdp", "model", None],
    "mlp/wi/kernel": ["fsdp", "model"],
    "mlp/wi/bias": ["model"],
    "mlp/wo/kernel": ["model", "fsdp"],
    "embeddings/word/embedding": ["model", "fsdp"],
    "embeddings/position/embedding": [None, "fsdp"],
    "embeddings/norm/scale": [None],
    "mlp_norm/bias": [None],
    "pooler/kernel": ["fsdp", "model"],
}
# by decoder: BERT's LM-head transform and bias; Llama's gated MLP, RMS norms, untied LM head and cross-attention gates
DECODER_EXPECTED = {
    "bert": {"lm_head/transform/kernel": ["fsdp", "model"], "lm_head/bias": ["model"]},
    "llama": {"decoder/layers_0/self_attention/key/kernel": ["fsdp", "model", None],
              "decoder/layers_0/self_attention/value/kernel": ["fsdp", "model", None],
              "mlp/wi_gate/kernel": ["fsdp", "model"], "final_norm/scale": [None],
              "lm_head/output/kernel": ["fsdp", "model"], "cross_attention_gate": []},
}


def _normal(spec):
    spec = [e[0] if isinstance(e, list) and len(e) == 1 else e for e in spec]
    while spec and spec[-1] is None:
        spec.pop()
    return spec


def test_every_weight_is_sharded_as_the_rules_say(result):
    specs, shapes, shard_shapes = result["specs"], result["shapes"], result["shard_shapes"]
    expected = {**EXPECTED, **DECODER_EXPECTED[result["decoder"]]}
    seen = set()
    for path, spec in specs.items():
        for suffix, want in expected.items():
            if path.endswith(suffix):
                seen.add(suffix)
                assert _normal(spec) == _normal(want), (path, spec, want)
                # the local shard really is the global shape divided by the mesh axes
                sizes = {"data": 2, "fsdp": 2, "model": 2, None: 1}
                want_shard = [d // sizes[a] for d, a in zip(shapes[path], want + [None] * len(shapes[path]))]
                assert shard_shapes[path] == want_shard, (path, shard_shapes[path], want_shard)
        if path.endswith("kernel") or path.endswith("embedding"):
            assert any(e is not None for e in spec), f"weight matrix {path} is replicated"
    assert seen == set(expected)
    assert result["report_ok"] and not result["report_unfitted"]


def test_no_involuntary_rematerialization(result):
    # the partitioner found a plan for every op without gathering whole activations
    # (see parallel.shard.activation_constraint)
    assert "Involuntary full rematerialization" not in result["stderr"]


def test_optimizer_moments_follow_their_params(result):
    for path, spec in result["mu_specs"].items():
        assert _normal(spec) == _normal(result["specs"][path]), path

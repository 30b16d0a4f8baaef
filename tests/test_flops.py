"""``jaxencdec.train.flops`` against the matmuls our model really runs: the FLOPs of every ``dot_general`` of the
lowered forward pass (2 per multiply-add), for decoders of each kind the formula distinguishes."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import pytest

import testing
from flax import linen as nn

from jaxencdec.config import EncoderDecoderConfig, HFConfig
from jaxencdec.models.encoder_decoder import EncoderDecoderModule
from jaxencdec.train.flops import forward_flops, train_flops

DOT = re.compile(r"stablehlo\.dot_general.*contracting_dims = \[([\d, ]*)\] x .*:\s*\(tensor<([\dx]+)x\w+>, "
                 r"tensor<[\dx]+x\w+>\)\s*->\s*tensor<([\dx]+)x\w+>")


def dot_flops(stablehlo: str) -> int:
    """2 x output elements x contracted size, summed over the dot_generals of a lowered program (one inlined
    function: every op runs once)."""
    assert "func.call" not in stablehlo
    total = 0
    for found in DOT.finditer(stablehlo):
        lhs = [int(d) for d in found.group(2).split("x")]
        out = [int(d) for d in found.group(3).split("x")]
        total += 2 * math.prod(out) * math.prod(lhs[int(i)] for i in found.group(1).split(","))
    return total


DECODERS = {
    "bert": testing.tiny_bert(256, hidden=64, heads=4),  # LM-head transform, tied
    "gpt2": testing.tiny_gpt2(256, hidden=64, heads=4),
    # grouped-query attention, heads wider than hidden / heads, gated MLP, untied LM head
    "llama": {**testing.tiny_llama(256, hidden=64, heads=4, kv_heads=2), "head_dim": 24},
}


@pytest.mark.parametrize("encoder_hidden", [64, 48], ids=["same-width", "projected"])
@pytest.mark.parametrize("decoder", list(DECODERS))
def test_forward_flops_count_every_matmul_the_model_runs(decoder, encoder_hidden):
    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        HFConfig.from_dict(testing.tiny_bert(256, hidden=encoder_hidden, heads=4)),
        HFConfig.from_dict(DECODERS[decoder]), decoder_start_token_id=2, pad_token_id=0)
    module = EncoderDecoderModule(config)
    batch, source, target = 2, 24, 16
    ids, decoder_ids = jnp.ones((batch, source), jnp.int32), jnp.ones((batch, target), jnp.int32)
    params = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), ids, ids, decoder_ids))["params"]  # shapes only
    forward = lambda p: module.apply({"params": p}, ids, jnp.ones_like(ids), decoder_ids, jnp.ones_like(decoder_ids))
    counted = dot_flops(jax.jit(forward).lower(params).as_text())
    assert counted == forward_flops(config, batch, source, target)  # exactly: the pooler does not run
    assert train_flops(config, batch, source, target) == 3 * forward_flops(config, batch, source, target)

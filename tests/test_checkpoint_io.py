"""Tests for the files of a checkpoint (``storage``, ``checkpoint.formats``, ``checkpoint.weights``,
``checkpoint.hub``): real files in every format, no format mocks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from flax.serialization import msgpack_serialize
from safetensors.torch import save_file as torch_save_safetensors

from jaxencdec import storage
from jaxencdec.checkpoint import formats, hub, weights
from jaxencdec.errors import CheckpointError


def _rng_state_dict() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "encoder.embeddings.word_embeddings.weight": rng.standard_normal((7, 4)).astype(np.float32),
        "encoder.embeddings.position_ids": np.arange(12, dtype=np.int64)[None, :],
        "decoder.cls.predictions.bias": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
        "decoder.scalar": np.array(2.5, dtype=np.float32),
        "decoder.mask": np.array([True, False, True]),
        "decoder.half": rng.standard_normal((2, 3)).astype(np.float16),
    }


def assert_bit_identical(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert isinstance(g, np.ndarray), k
        assert g.dtype == w.dtype, (k, g.dtype, w.dtype)
        assert g.shape == w.shape, (k, g.shape, w.shape)
        assert g.tobytes() == np.ascontiguousarray(w).tobytes(), k


def _only_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------ safetensors


def test_safetensors_round_trip_bit_identical(tmp_path):
    sd = _rng_state_dict()
    formats.write_safetensors(sd, tmp_path / "model.safetensors")
    assert _only_files(tmp_path) == ["model.safetensors"]
    assert_bit_identical(formats.read_safetensors(tmp_path / "model.safetensors"), sd)
    assert_bit_identical(weights.read_state_dict(tmp_path), sd)


def test_written_safetensors_readable_by_reference_libraries(tmp_path):
    import safetensors.numpy
    import safetensors.torch
    from safetensors import safe_open

    sd = _rng_state_dict()
    path = tmp_path / "model.safetensors"
    formats.write_safetensors(sd, path)
    assert_bit_identical(safetensors.numpy.load_file(str(path)), sd)
    tsd = safetensors.torch.load_file(str(path))
    assert tsd["decoder.cls.predictions.bias"].dtype == torch.bfloat16
    assert (
        tsd["decoder.cls.predictions.bias"].view(torch.int16).numpy().tobytes()
        == sd["decoder.cls.predictions.bias"].tobytes()
    )
    assert tsd["decoder.scalar"].shape == ()
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_reads_safetensors_written_by_torch(tmp_path):
    t = {
        "w": torch.randn(3, 5),
        "ids": torch.arange(4, dtype=torch.int64),
        "bf": torch.randn(6, dtype=torch.bfloat16),
    }
    torch_save_safetensors(t, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    got = weights.read_state_dict(tmp_path)
    assert got["bf"].dtype == ml_dtypes.bfloat16
    assert got["bf"].tobytes() == t["bf"].view(torch.int16).numpy().tobytes()
    np.testing.assert_array_equal(got["w"], t["w"].numpy())
    np.testing.assert_array_equal(got["ids"], t["ids"].numpy())


def test_transformers_save_pretrained_reads_back(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=20,
    )
    model = BertModel(cfg)
    model.save_pretrained(tmp_path)
    got = weights.read_state_dict(tmp_path)
    ref = model.state_dict()
    assert "embeddings.word_embeddings.weight" in got
    assert "encoder.layer.0.attention.self.query.weight" in got
    for k, v in got.items():
        np.testing.assert_array_equal(v, ref[k].numpy(), err_msg=k)


def _write_two_shards(folder: Path, sd: dict) -> dict:
    names = sorted(sd)
    part1 = {k: sd[k] for k in names[:3]}
    part2 = {k: sd[k] for k in names[3:]}
    formats.write_safetensors(part1, folder / "model-00001-of-00002.safetensors")
    formats.write_safetensors(part2, folder / "model-00002-of-00002.safetensors")
    index = {
        "metadata": {"total_size": int(sum(a.nbytes for a in sd.values()))},
        "weight_map": {
            **{k: "model-00001-of-00002.safetensors" for k in part1},
            **{k: "model-00002-of-00002.safetensors" for k in part2},
        },
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def test_sharded_safetensors_reads_union(tmp_path):
    sd = _rng_state_dict()
    _write_two_shards(tmp_path, sd)
    kind, files = weights.find_weights(tmp_path)
    assert kind == "safetensors"
    assert [f.name for f in files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert_bit_identical(weights.read_state_dict(tmp_path), sd)


def test_index_naming_missing_shard(tmp_path):
    sd = _rng_state_dict()
    _write_two_shards(tmp_path, sd)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors") as ei:
        weights.find_weights(tmp_path)
    assert "missing" in str(ei.value)
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        weights.read_state_dict(tmp_path)


def test_index_listing_tensor_absent_from_shard(tmp_path):
    sd = _rng_state_dict()
    index = _write_two_shards(tmp_path, sd)
    index["weight_map"]["decoder.ghost"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="decoder.ghost"):
        weights.read_state_dict(tmp_path)


def test_truncated_safetensors(tmp_path):
    formats.write_safetensors(_rng_state_dict(), tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors") as ei:
        weights.read_state_dict(tmp_path)
    assert str(path) in str(ei.value)


def test_garbage_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors") as ei:
        weights.read_state_dict(tmp_path)
    assert str(path) in str(ei.value)


def test_find_weights_order_and_nothing_found(tmp_path):
    with pytest.raises(CheckpointError) as ei:
        weights.find_weights(tmp_path)
    msg = str(ei.value)
    for name in (
        "model.safetensors", "model.safetensors.index.json", "flax_model.msgpack",
        "flax_model.msgpack.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
    ):
        assert name in msg
    assert str(tmp_path) in msg

    torch.save({"x": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    assert weights.find_weights(tmp_path) == ("pytorch", [tmp_path / "pytorch_model.bin"])
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize({"x": {"bias": np.ones(2)}}))
    assert weights.find_weights(tmp_path) == ("flax", [tmp_path / "flax_model.msgpack"])
    formats.write_safetensors({"x": np.full(2, 3.0)}, tmp_path / "model.safetensors")
    assert weights.find_weights(tmp_path) == ("safetensors", [tmp_path / "model.safetensors"])
    np.testing.assert_array_equal(weights.read_state_dict(tmp_path)["x"], [3.0, 3.0])


# ------------------------------------------------------------------ pytorch .bin


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pytorch_bin_is_refused_not_executed(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "evil": _RunsCode(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused") as ei:
        weights.read_state_dict(tmp_path)
    assert "execute code" in str(ei.value)
    assert str(path) in str(ei.value)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_pytorch_bin_round_trip(tmp_path):
    torch.manual_seed(0)
    t = {
        "encoder.embeddings.word_embeddings.weight": torch.randn(7, 4),
        "encoder.embeddings.position_ids": torch.arange(12)[None, :],
        "decoder.cls.predictions.bias": torch.randn(7, dtype=torch.bfloat16),
        "decoder.half": torch.randn(2, 3, dtype=torch.float16),
    }
    # tied weights share storage in real checkpoints
    t["decoder.cls.predictions.decoder.weight"] = t["encoder.embeddings.word_embeddings.weight"]
    torch.save(t, tmp_path / "pytorch_model.bin")
    got = weights.read_state_dict(tmp_path)
    assert set(got) == set(t)
    for k, v in t.items():
        if v.dtype == torch.bfloat16:
            assert got[k].dtype == ml_dtypes.bfloat16
            assert got[k].tobytes() == v.view(torch.int16).numpy().tobytes()
        else:
            assert got[k].dtype == v.numpy().dtype
            np.testing.assert_array_equal(got[k], v.numpy())
    # no aliasing between tied entries
    got["decoder.cls.predictions.decoder.weight"][0, 0] = 123.0
    assert got["encoder.embeddings.word_embeddings.weight"][0, 0] != 123.0


def test_sharded_pytorch_bin(tmp_path):
    a = {"a.weight": torch.randn(2, 2)}
    b = {"b.bias": torch.randn(3)}
    torch.save(a, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(b, tmp_path / "pytorch_model-00002-of-00002.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "pytorch_model-00001-of-00002.bin",
        "b.bias": "pytorch_model-00002-of-00002.bin",
    }}))
    got = weights.read_state_dict(tmp_path)
    np.testing.assert_array_equal(got["a.weight"], a["a.weight"].numpy())
    np.testing.assert_array_equal(got["b.bias"], b["b.bias"].numpy())


def test_truncated_pytorch_bin(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as ei:
        weights.read_state_dict(tmp_path)
    assert str(path) in str(ei.value)


def test_pytorch_bin_without_torch(tmp_path, monkeypatch):
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(CheckpointError, match=r"jaxencdec\[convert\]") as ei:
        weights.read_state_dict(tmp_path)
    assert "safetensors" in str(ei.value)


# ------------------------------------------------------------------ msgpack


def test_hf_flax_msgpack_reads_as_pytorch_names(tmp_path):
    rng = np.random.default_rng(1)
    K = rng.standard_normal((4, 6)).astype(np.float32)  # [in, out]
    b = rng.standard_normal(6).astype(np.float32)
    s = rng.standard_normal(4).astype(np.float32)
    c = rng.standard_normal(4).astype(np.float32)
    E = rng.standard_normal((10, 4)).astype(np.float32)
    tree = {"encoder": {
        "layer": {"0": {"dense": {"kernel": K, "bias": b}}},
        "LayerNorm": {"scale": s, "bias": c},
        "word_embeddings": {"embedding": E},
    }}
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(tree))
    got = weights.read_state_dict(tmp_path)
    assert set(got) == {
        "encoder.layer.0.dense.weight", "encoder.layer.0.dense.bias",
        "encoder.LayerNorm.weight", "encoder.LayerNorm.bias",
        "encoder.word_embeddings.weight",
    }
    assert got["encoder.layer.0.dense.weight"].shape == (6, 4)
    np.testing.assert_array_equal(got["encoder.layer.0.dense.weight"], K.T)
    np.testing.assert_array_equal(got["encoder.layer.0.dense.bias"], b)
    np.testing.assert_array_equal(got["encoder.LayerNorm.weight"], s)
    np.testing.assert_array_equal(got["encoder.LayerNorm.bias"], c)
    np.testing.assert_array_equal(got["encoder.word_embeddings.weight"], E)  # not transposed


def test_sharded_hf_flax_msgpack(tmp_path):
    K = np.arange(6, dtype=np.float32).reshape(2, 3)
    (tmp_path / "flax_model-00001-of-00002.msgpack").write_bytes(
        msgpack_serialize({"h": {"0": {"attn": {"c_attn": {"kernel": K}}}}}))
    (tmp_path / "flax_model-00002-of-00002.msgpack").write_bytes(
        msgpack_serialize({"h": {"0": {"attn": {"c_attn": {"bias": np.ones(3, np.float32)}}}}}))
    (tmp_path / "flax_model.msgpack.index.json").write_text(json.dumps({"weight_map": {
        "h/0/attn/c_attn/kernel": "flax_model-00001-of-00002.msgpack",
        "h/0/attn/c_attn/bias": "flax_model-00002-of-00002.msgpack",
    }}))
    got = weights.read_state_dict(tmp_path)
    np.testing.assert_array_equal(got["h.0.attn.c_attn.weight"], K.T)
    np.testing.assert_array_equal(got["h.0.attn.c_attn.bias"], np.ones(3))


def test_msgpack_round_trip(tmp_path):
    tree = {
        "encoder": {"layer_0": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
                                "bias": np.array([1, 2], dtype=ml_dtypes.bfloat16)}},
        "step": np.array(7, dtype=np.int32),
    }
    formats.write_msgpack(tree, tmp_path / "params.msgpack")
    assert _only_files(tmp_path) == ["params.msgpack"]
    got = formats.read_msgpack(tmp_path / "params.msgpack")
    assert set(got) == {"encoder", "step"}
    assert_bit_identical(got["encoder"]["layer_0"], tree["encoder"]["layer_0"])
    assert got["step"].shape == () and int(got["step"]) == 7


def test_truncated_and_garbage_msgpack(tmp_path):
    path = tmp_path / "params.msgpack"
    formats.write_msgpack({"a": {"kernel": np.ones((32, 32), np.float32)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt msgpack") as ei:
        formats.read_msgpack(path)
    assert str(path) in str(ei.value)
    path.write_bytes(b"\x07 definitely not msgpack of a dict")
    with pytest.raises(CheckpointError, match="truncated or corrupt msgpack"):
        formats.read_msgpack(path)
    # same through the HF-Flax path
    (tmp_path / "flax_model.msgpack").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="flax_model.msgpack"):
        weights.read_state_dict(tmp_path)


# ------------------------------------------------------------------ json


def test_json_round_trip_and_format(tmp_path):
    path = tmp_path / "config.json"
    storage.write_json({"b": 1, "a": {"y": [1, 2], "x": None}}, path)
    text = path.read_text()
    assert text == json.dumps({"a": {"x": None, "y": [1, 2]}, "b": 1}, indent=2) + "\n"
    assert storage.read_json(path) == {"a": {"x": None, "y": [1, 2]}, "b": 1}


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "not found"),
        ('{"hidden_size": 4,,}', "invalid JSON"),
        ("[1, 2, 3]", "not an object"),
        (b"\xff\xfe\x00bad", "cannot read"),
    ],
)
def test_invalid_json(tmp_path, content, fragment):
    path = tmp_path / "config.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(CheckpointError, match=fragment) as ei:
        storage.read_json(path)
    assert str(path) in str(ei.value)


# ------------------------------------------------------------------ atomic writes


_WRITERS = {
    "safetensors": lambda p: formats.write_safetensors({"w": np.arange(1000, dtype=np.float32)}, p),
    "msgpack": lambda p: formats.write_msgpack({"w": {"kernel": np.arange(1000, dtype=np.float32)}}, p),
    "json": lambda p: storage.write_json({"key": "x" * 1000}, p),
}


@pytest.mark.parametrize("fmt", sorted(_WRITERS))
def test_atomic_write_failure_keeps_previous_file(tmp_path, monkeypatch, fmt):
    path = tmp_path / f"target.{fmt}"
    path.write_bytes(b"previous content")
    real_write = storage._write_bytes
    calls = []

    def half_then_fail(f, data):
        calls.append(1)
        mv = memoryview(data).cast("B")
        real_write(f, mv[: len(mv) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(storage, "_write_bytes", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        _WRITERS[fmt](path)
    assert calls, "the writer did not go through storage._write_bytes"
    assert path.read_bytes() == b"previous content"
    assert _only_files(tmp_path) == [path.name]

    monkeypatch.setattr(storage, "_write_bytes", real_write)
    _WRITERS[fmt](path)
    assert path.read_bytes() != b"previous content"
    assert _only_files(tmp_path) == [path.name]


def test_atomic_write_failure_at_replace_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    storage.write_json({"v": 1}, path)

    def boom(src, dst):
        raise OSError("replace failed (simulated)")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        storage.write_json({"v": 2}, path)
    monkeypatch.undo()
    assert storage.read_json(path) == {"v": 1}
    assert _only_files(tmp_path) == ["config.json"]


# ------------------------------------------------------------------ resolve_model_folder


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def test_resolve_local_folder(tmp_path, offline_hub):
    assert hub.resolve_model_folder(str(tmp_path)) == tmp_path
    assert hub.resolve_model_folder(tmp_path) == tmp_path


@pytest.mark.parametrize("kind", ["absolute", "dot", "home", "nested"])
def test_resolve_nonexistent_local_path(tmp_path, offline_hub, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    p = {
        "absolute": str(tmp_path / "does" / "not" / "exist"),
        "dot": "./missing-model",
        "home": "~/jaxencdec-no-such-model-dir",
        "nested": "runs/exp1/checkpoint",
    }[kind]
    with pytest.raises(CheckpointError, match="neither a local folder nor a reachable hub repo") as ei:
        hub.resolve_model_folder(p)
    assert p in str(ei.value)
    assert "\n" not in str(ei.value)


def test_resolve_file_is_not_a_folder(tmp_path, offline_hub):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        hub.resolve_model_folder(str(f))


def test_resolve_unreachable_hub_repo(offline_hub):
    with pytest.raises(CheckpointError, match="neither a local folder nor a reachable hub repo") as ei:
        hub.resolve_model_folder("jaxencdec-test-org/no-such-model")
    assert "jaxencdec-test-org/no-such-model" in str(ei.value)
    assert "\n" not in str(ei.value)

"""Models, PyTorch exports and tokenizers saved to and loaded from gs:// paths, against a real GCS API emulator
(fake-gcs-server, tests/gcs_emulator.py); what lands in the bucket is listed through the emulator's own JSON API."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (fixtures)
from hf_reference import PAD, SMALL, START, batch, hf_encoder_decoder, torch_forward
from jaxencdec import EncoderDecoderModel, GenerationConfig, Tokenizer, paths, storage
from jaxencdec.checkpoint import formats, weights
from jaxencdec.errors import CheckpointError

TEXTS = ["JAX compiles numerical programs for accelerators.", "Flax is a neural network library, isn't it?"]


@pytest.fixture(scope="module")
def hf_model():
    return hf_encoder_decoder("bert", "gpt2", seed=3)


@pytest.fixture(scope="module")
def model(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(folder)
    return EncoderDecoderModel.from_pretrained(folder)


def _flat_params(model) -> dict[str, np.ndarray]:
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, model.params), sep="/")


def test_save_pretrained_writes_the_bucket_and_from_pretrained_reads_it_back(model, gcs_bucket, gcs_emulator,
                                                                            tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"{gcs_bucket}/bert2gpt2"
    saved = model.save_pretrained(url)
    assert os.fspath(saved) == url
    assert gcs_emulator.object_names(gcs_bucket, "bert2gpt2/") == [
        "bert2gpt2/config.json", "bert2gpt2/flax_model.msgpack", "bert2gpt2/generation_config.json"]
    assert list(tmp_path.iterdir()) == []  # no local ./gs:/... folder

    loaded = EncoderDecoderModel.from_pretrained(url)
    expected, actual = _flat_params(model), _flat_params(loaded)
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype and np.array_equal(actual[name], value), name
    ids, mask, _ = batch()
    options = dict(max_new_tokens=6, num_beams=2)
    np.testing.assert_array_equal(np.asarray(loaded.generate(ids, mask, **options)),
                                  np.asarray(model.generate(ids, mask, **options)))


def test_export_pytorch_to_the_bucket_loads_in_transformers(model, hf_model, gcs_bucket, gcs_emulator, tmp_path):
    import fsspec
    import transformers

    url = f"{gcs_bucket}/bert2gpt2-pt"
    model.export_pytorch(url)
    assert gcs_emulator.object_names(gcs_bucket, "bert2gpt2-pt/") == [
        "bert2gpt2-pt/config.json", "bert2gpt2-pt/generation_config.json", "bert2gpt2-pt/model.safetensors"]
    fsspec.filesystem("gs").get(f"{url}/", str(tmp_path / "pt"), recursive=True)  # gcsfs
    exported = transformers.EncoderDecoderModel.from_pretrained(tmp_path / "pt").eval()
    ids, mask, labels = batch()
    np.testing.assert_array_equal(torch_forward(exported, ids, mask, labels)[0],
                                  torch_forward(hf_model, ids, mask, labels)[0])


def test_a_new_save_replaces_the_weights_of_an_earlier_one_and_keeps_other_files(model, minilm_path, gcs_bucket,
                                                                                  gcs_emulator):
    url = f"{gcs_bucket}/replaced"
    model.save_pretrained(url)
    Tokenizer.from_pretrained(minilm_path).save_pretrained(url)
    model.export_pytorch(url)  # model.safetensors: flax_model.msgpack would now be stale
    assert gcs_emulator.object_names(gcs_bucket, "replaced/") == [
        "replaced/config.json", "replaced/generation_config.json", "replaced/model.safetensors",
        "replaced/tokenizer.json", "replaced/tokenizer_config.json"]
    assert weights.find_weights(url)[0] == "safetensors"


def test_warm_start_from_bucket_folders(gcs_bucket, tmp_path):
    import fsspec
    import transformers

    bert = transformers.BertModel(SMALL["bert"]())
    bert.save_pretrained(tmp_path / "bert")
    url = f"{gcs_bucket}/small-bert"
    fsspec.filesystem("gs").put(f"{tmp_path / 'bert'}/", f"{url}/", recursive=True)  # gcsfs
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(url, url, decoder_start_token_id=START,
                                                                pad_token_id=PAD)
    loaded = model.pytorch_state_dict()
    for name, value in bert.state_dict().items():
        np.testing.assert_array_equal(loaded[f"encoder.{name}"], value.numpy(), name)


def test_a_save_that_fails_leaves_the_bucket_untouched(gcs_bucket, gcs_emulator):
    url = f"{gcs_bucket}/failed"
    storage.write_json({"kept": True}, f"{url}/config.json")
    with pytest.raises(RuntimeError, match="while saving"):
        with storage.atomic_folder(url) as staging:
            storage.write_json({"kept": False}, staging / "config.json")
            formats.write_msgpack({"w": np.ones(3)}, staging / "flax_model.msgpack")
            raise RuntimeError("while saving")
    assert gcs_emulator.object_names(gcs_bucket, "failed/") == ["failed/config.json"]
    assert storage.read_json(f"{url}/config.json") == {"kept": True}


def test_copy_folder_copies_every_file_on_the_bucket_and_links_local_ones(gcs_bucket, gcs_emulator, tmp_path):
    """What a checkpoint set aside keeps: every file, nested folders too, after the source is deleted; locally the
    files are hard links (no bytes copied); an existing target is refused before anything is written."""
    files = {"meta/metadata": b"{}", "state/array_metadatas/process_0": b"x" * 10, "_CHECKPOINT_METADATA": b"{}"}
    for root in (str(tmp_path / "ckpt"), f"{gcs_bucket}/ckpt"):
        for name, data in files.items():
            paths.as_path(f"{root}/6/{name}").parent.mkdir(parents=True, exist_ok=True)
            paths.write_bytes(f"{root}/6/{name}", data)
        paths.copy_folder(f"{root}/6", f"{root}/6.corrupt-1")
        with pytest.raises(FileExistsError, match="6.corrupt-1: already exists"):
            paths.copy_folder(f"{root}/6", f"{root}/6.corrupt-1")
        if paths.is_url(root):
            paths.as_path(f"{root}/6").rmtree()
        else:
            assert os.path.samefile(f"{root}/6/meta/metadata", f"{root}/6.corrupt-1/meta/metadata")
            shutil.rmtree(f"{root}/6")
        assert {name: paths.read_bytes(f"{root}/6.corrupt-1/{name}") for name in files} == files
    assert gcs_emulator.object_names(gcs_bucket, "ckpt/") == sorted(f"ckpt/6.corrupt-1/{n}" for n in files)
    paths.copy_folder(f"{gcs_bucket}/ckpt/6.corrupt-1", str(tmp_path / "from-bucket"))  # one store to another
    assert {name: (tmp_path / "from-bucket" / name).read_bytes() for name in files} == files
    with pytest.raises(FileNotFoundError, match="no such folder"):
        paths.copy_folder(str(tmp_path / "ckpt/6"), str(tmp_path / "ckpt/6.corrupt-2"))


def test_tokenizer_round_trip_through_the_bucket(minilm_path, gcs_bucket, gcs_emulator):
    import fsspec

    local = Tokenizer.from_pretrained(minilm_path)
    url = f"{gcs_bucket}/minilm-tokenizer"
    assert local.save_pretrained(url) == (f"{url}/tokenizer.json", f"{url}/tokenizer_config.json")
    assert gcs_emulator.object_names(gcs_bucket, "minilm-tokenizer/") == [
        "minilm-tokenizer/tokenizer.json", "minilm-tokenizer/tokenizer_config.json"]
    expected = local(TEXTS)["input_ids"].tolist()
    assert Tokenizer.from_pretrained(url)(TEXTS)["input_ids"].tolist() == expected

    # The vocab.txt path (WordPiece built from the vocabulary file), with the files put there by gcsfs itself.
    gcsfs = fsspec.filesystem("gs")
    vocab_only = f"{gcs_bucket}/minilm-vocab"
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        gcsfs.put_file(os.path.join(minilm_path, name), f"{vocab_only}/{name}")
    assert Tokenizer.from_pretrained(vocab_only)(TEXTS)["input_ids"].tolist() == expected


def test_a_subprocess_reads_the_bucket_with_the_fixture_settings(model, gcs_bucket):
    url = f"{gcs_bucket}/for-a-subprocess"
    model.save_pretrained(url)
    script = f"from jaxencdec.checkpoint import weights; print(weights.find_weights({url!r})[1][0])"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"{url}/flax_model.msgpack"


def test_a_missing_bucket_path_is_an_error_naming_it(gcs_bucket):
    url = f"{gcs_bucket}/no-such-model"
    for missing in (url, "gs://jaxencdec-no-such-bucket/model"):
        with pytest.raises(CheckpointError, match=f"^{missing}: no such folder"):
            EncoderDecoderModel.from_pretrained(missing)
    with pytest.raises(CheckpointError, match=f"^{url}: no such folder"):
        EncoderDecoderModel.from_encoder_decoder_pretrained(url, url)
    with pytest.raises(FileNotFoundError, match=f"^{url}: no such folder"):
        Tokenizer.from_pretrained(url)


def test_a_url_folded_by_pathlib_is_refused(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="gs:/bucket/m: looks like a gs:// URL .* pass the URL as a string"):
        model.save_pretrained(Path("gs://bucket/m"))
    with pytest.raises(ValueError, match="unsupported URL scheme ftp://"):
        model.save_pretrained("ftp://host/m")
    assert list(tmp_path.iterdir()) == []


def test_generation_config_round_trip_through_the_bucket(gcs_bucket, gcs_emulator):
    config = GenerationConfig(num_beams=4, max_new_tokens=12, length_penalty=2.0, decoder_start_token_id=101)
    url = f"{gcs_bucket}/generation"
    written = config.save_pretrained(url)
    assert str(written) == f"{url}/generation_config.json"
    assert GenerationConfig.from_pretrained(url) == config


@pytest.mark.parametrize("url", ["gs://ab/model", "gs:///model", "gs://My_Bucket/model", "gs://-bucket/m",
                                 "gs://bucket-/m", "gs://" + "b" * 64 + "/m"])
def test_an_invalid_bucket_name_is_an_error_before_any_request(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="is not a valid bucket name: Cloud Storage bucket names have 3-63"):
        EncoderDecoderModel.from_pretrained(url)
    assert list(tmp_path.iterdir()) == []


def test_gs_without_credentials_or_emulator_is_an_error_naming_the_url_and_the_settings(tmp_path):
    """In a clean process: no emulator, no credentials, and no probe of the Compute Engine metadata server (which
    NO_GCE_CHECK=true turns off), so nothing leaves this machine."""
    settings = ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "FSSPEC_GS", "FSSPEC_GS_TOKEN",
                "FSSPEC_GCS", "FSSPEC_GCS_TOKEN")
    env = {name: value for name, value in os.environ.items() if name not in settings}
    env.update(NO_GCE_CHECK="true", CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), JAX_PLATFORMS="cpu")
    script = """
from jaxencdec import EncoderDecoderModel, paths
for attempt in (lambda: EncoderDecoderModel.from_pretrained("gs://some-bucket/model"),
                lambda: EncoderDecoderModel.from_pretrained({local!r}).save_pretrained("gs://some-bucket/saved")):
    try:
        attempt()
    except paths.StorageError as error:
        print(error)
"""
    folder = tmp_path / "model"
    hf_encoder_decoder("bert", "bert").save_pretrained(folder)
    result = subprocess.run([sys.executable, "-c", script.format(local=str(folder))], capture_output=True, text=True,
                            timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    messages = result.stdout.strip().split("\n")
    assert [m.split(":", 2)[:2] for m in messages] == [["gs", "//some-bucket/model"], ["gs", "//some-bucket/saved"]]
    for message in messages:
        assert "no Google Cloud credentials found" in message
        assert "GOOGLE_APPLICATION_CREDENTIALS" in message and "STORAGE_EMULATOR_HOST=http://HOST:PORT" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing saved locally instead


def test_orbax_checkpoints_through_the_emulator(gcs_bucket, gcs_emulator):
    """The fixture's settings reach tensorstore (orbax's arrays) and gcsfs (orbax's metadata files)."""
    import orbax.checkpoint as ocp
    from etils import epath

    tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": {"step": np.asarray(7, np.int32)}}
    ocp.PyTreeCheckpointer().save(epath.Path(gcs_bucket) / "ckpt" / "tree", tree)
    restored = ocp.PyTreeCheckpointer().restore(epath.Path(gcs_bucket) / "ckpt" / "tree")
    np.testing.assert_array_equal(restored["w"], tree["w"])
    assert int(restored["b"]["step"]) == 7

    with ocp.CheckpointManager(epath.Path(gcs_bucket) / "ckpt" / "managed") as manager:
        manager.save(3, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()
        assert manager.latest_step() == 3
        restored = manager.restore(3, args=ocp.args.StandardRestore(tree))
    np.testing.assert_array_equal(restored["w"], tree["w"])
    names = gcs_emulator.object_names(gcs_bucket, "ckpt/")
    assert "ckpt/tree/_METADATA" in names and any(n.startswith("ckpt/managed/3/") for n in names)
    assert paths.is_dir(f"{gcs_bucket}/ckpt/managed/3")

"""Exported generate (``jaxencdec.generation.export`` / ``serving``): one export per model and mode, loaded in a
fresh process that never imports the model code, gives the ids of ``make_generate_fn`` at every batch size and
source length (both symbolic), and carries TPU and CUDA lowerings made on this CPU-only machine.

The serving process runs in a virtualenv that holds only what the README's "Serving" section says to install
(the distributions it names and what they require, linked from this environment, and jaxencdec without its
dependencies): a missing dependency, or a sentence that names too few, fails here."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import jax
import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import testing
from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (pytest fixtures)
from hf_reference import batch, hf_encoder_decoder
from jaxencdec import EncoderDecoderModel, GenerationConfigError, Tokenizer, paths
from jaxencdec.generation.api import make_generate_fn
from jaxencdec.generation.export import export_generate
from jaxencdec.generation.serving import EXPORTED_NAME, MANIFEST_NAME, load_generate

pytestmark = pytest.mark.slow  # a serving process in a child, and exports for three platforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"greedy": {}, "beam4": {"num_beams": 4}, "sampling": {"do_sample": True}}
SHAPES = ((1, 5), (3, 9), (8, 13))  # (batch, source length): every one served by the same export
MAX_NEW_TOKENS = 6
SEED = 4
# Modules a serving process must not import (the model, its layers, the search and what builds them).
MODEL_CODE = ("jaxencdec.models.transformer", "jaxencdec.nn", "jaxencdec.generation.search",
              "jaxencdec.generation.api", "jaxencdec.modeling")

# Runs in a fresh interpreter: loads every artifact, calls it on every input, saves the ids, and prints which
# model modules got imported on the way.
TEXT = "a served tokenizer turns text into ids"
SERVER = f"TEXT = {TEXT!r}" + """
import json, sys
import jax, numpy as np
from jaxencdec.generation.serving import load_generate

root, names, seed, forbidden = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4].split(",")
from jaxencdec.tokenizer import Tokenizer
tokenizer = Tokenizer.from_pretrained(f"{root}/{names[0]}")  # the tokenizer exported beside the first program
np.save(f"{root}/tokenized.npy", np.asarray(tokenizer(TEXT)["input_ids"]))
inputs = np.load(f"{root}/inputs.npz")
shapes = sorted({key.split("/")[0] for key in inputs.files})
outputs = {}
for name in names:
    generate = load_generate(f"{root}/{name}")
    for shape in shapes:
        ids = generate(inputs[f"{shape}/ids"], inputs[f"{shape}/mask"], jax.random.key(seed))
        outputs[f"{name}/{shape}"] = np.asarray(ids)
np.savez(f"{root}/outputs.npz", **outputs)
print(json.dumps([module for module in forbidden if module in sys.modules]))
"""


def _inputs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``"BxS" -> (ids, mask)`` int32, padded rows of different lengths."""
    out = {}
    for size, length in SHAPES:
        ids, mask, _ = batch(seed=size, batch_size=size, src_len=length)
        out[f"{size}x{length}"] = (ids.astype(np.int32), mask.astype(np.int32))
    return out


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict:
    """``name -> folder`` of small random bert2bert and bert2gpt2, saved by transformers."""
    root = tmp_path_factory.mktemp("hf")
    for name in ("bert2bert", "bert2gpt2"):
        hf_encoder_decoder("bert", name[len("bert2"):], seed=5).save_pretrained(root / name)
    return {name: root / name for name in ("bert2bert", "bert2gpt2")}


def serving_requirements() -> list[str]:
    """What the README's "Serving" section says a serving environment installs (besides jaxencdec, --no-deps)."""
    text = " ".join((Path(REPO) / "README.md").read_text().split("## Serving", 1)[1].split())
    found = re.search(r"it needs `pip install ([^`]+)` and `pip install --no-deps jaxencdec`", text)
    assert found, "README's Serving section no longer names what serving installs"
    return shlex.split(found.group(1))


def _required(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions ``requirements`` name and, recursively, those they require (extras and
    environment markers evaluated as pip does); a requirement this environment does not satisfy is an error."""
    found: dict[str, metadata.Distribution] = {}
    extras: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in found and requirement.extras <= extras[name]:
            continue
        distribution = metadata.distribution(requirement.name)
        assert requirement.specifier.contains(distribution.version, prereleases=True), (requirement,
                                                                                       distribution.version)
        found[name], extras[name] = distribution, extras.get(name, set()) | requirement.extras
        for line in distribution.requires or []:
            needed = Requirement(line)
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra})
                                            for extra in extras[name] | {""}):
                todo.append(needed)
    return found


def serving_venv(folder: Path) -> Path:
    """A virtualenv at ``folder`` holding the README's serving requirements (linked from this environment's
    site-packages) and the jaxencdec package of this checkout, nothing else. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(folder), "platbase": str(folder)}))
    for distribution in _required(serving_requirements()).values():
        tops = {Path(str(f)).parts[0] for f in distribution.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(str(distribution.locate_file(top)))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    (site / "jaxencdec").symlink_to(Path(REPO) / "jaxencdec")  # pip install --no-deps jaxencdec
    return folder / "bin" / "python"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, hf_folders, minilm_path):
    """Exports every (model, mode) once into ``root/<model>-<mode>``, starts the serving process on them, and
    meanwhile computes ``expected["<model>-<mode>/BxS"]``, the ids of ``make_generate_fn`` on the same inputs and
    key. Returns ``(root, models, expected, served)``, ``served`` the serving process's ``CompletedProcess``.

    Both processes compile with the test run's ``XLA_FLAGS`` (``testing.FAST_COMPILE_FLAGS``), so that they run the
    same XLA passes. The serving process runs in ``serving_venv``; the first export also holds a tokenizer."""
    root = tmp_path_factory.mktemp("exported")
    inputs = _inputs()
    np.savez(root / "inputs.npz", **{f"{shape}/{part}": array for shape, (ids, mask) in inputs.items()
                                     for part, array in (("ids", ids), ("mask", mask))})
    models, configs = {}, {}
    for name, folder in hf_folders.items():
        model = models[name] = EncoderDecoderModel.from_pretrained(folder)
        for mode, options in MODES.items():
            configs[f"{name}-{mode}"] = config = model.generation_config.replace(max_new_tokens=MAX_NEW_TOKENS,
                                                                                 **options)
            export_generate(model, config, folder=root / f"{name}-{mode}")
    Tokenizer.from_pretrained(minilm_path).save_pretrained(root / next(iter(configs)))
    python = serving_venv(tmp_path_factory.mktemp("serving-venv"))
    with open(root / "server.out", "w") as stdout, open(root / "server.err", "w") as stderr:  # no pipe to fill up
        server = subprocess.Popen([str(python), "-c", SERVER, str(root), ",".join(configs), str(SEED),
                                   ",".join(MODEL_CODE)], stdout=stdout, stderr=stderr, cwd=root,
                                  env=_serving_env())
    try:
        expected = {}
        for case, config in configs.items():
            model = models[case.split("-")[0]]
            generate_fn = make_generate_fn(model.config, config)
            for shape, (ids, mask) in inputs.items():
                expected[f"{case}/{shape}"] = np.asarray(generate_fn(model.params, ids, mask, jax.random.key(SEED)))
        server.wait(timeout=600)
    finally:
        server.kill()  # only if the test failed before it finished
    return root, models, expected, subprocess.CompletedProcess(
        server.args, server.returncode, (root / "server.out").read_text(), (root / "server.err").read_text())


def _fresh_python_env() -> dict[str, str]:
    """The environment for a child on the CPU, compiling as this process does, that finds this checkout
    even when it is not installed."""
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), REPO]))
    return testing.subprocess_env(None, PYTHONPATH=path)


def _serving_env() -> dict[str, str]:
    """A child's environment for the serving virtualenv: nothing added to its path (no PYTHONPATH, no user site)."""
    env = {k: v for k, v in testing.subprocess_env(None).items() if k != "PYTHONPATH"}
    return {**env, "PYTHONNOUSERSITE": "1"}


def test_loaded_artifact_matches_make_generate_fn_without_model_code(exported):
    root, models, expected, served = exported
    assert served.returncode == 0, served.stderr[-3000:]
    assert json.loads(served.stdout.strip().splitlines()[-1]) == [], "the serving process imported model code"
    served_tokenizer = Tokenizer.from_pretrained(root / f"{next(iter(models))}-{next(iter(MODES))}")
    np.testing.assert_array_equal(np.load(root / "tokenized.npy"), served_tokenizer(TEXT)["input_ids"])
    outputs = np.load(root / "outputs.npz")
    assert sorted(outputs.files) == sorted(expected)
    for key, ids in expected.items():
        assert ids.shape == (int(key.split("/")[1].split("x")[0]), 1 + MAX_NEW_TOKENS)
        np.testing.assert_array_equal(outputs[key], ids, err_msg=key)
    # the comparison means something: the three modes give different ids here
    for name in models:
        assert not np.array_equal(expected[f"{name}-greedy/8x13"], expected[f"{name}-sampling/8x13"])
        assert not np.array_equal(expected[f"{name}-greedy/8x13"], expected[f"{name}-beam4/8x13"])


def test_artifact_is_lowered_for_tpu_and_cuda_with_symbolic_shapes(exported):
    root, models, expected, _ = exported
    for name in sorted({key.split("/")[0] for key in expected}):
        program = jax.export.deserialize(bytearray((root / name / EXPORTED_NAME).read_bytes()))
        assert {"cpu", "cuda", "tpu"} <= set(program.platforms), name
        ids_aval, mask_aval, key_aval = program.in_avals[-3:]
        assert [str(d) for d in ids_aval.shape] == ["batch", "source_length"] and ids_aval.dtype == np.int32
        assert mask_aval.shape == ids_aval.shape and (key_aval.shape, key_aval.dtype) == ((2,), np.uint32)
        assert [str(d) for d in program.out_avals[0].shape] == ["batch", str(1 + MAX_NEW_TOKENS)]
        manifest = json.loads((root / name / MANIFEST_NAME).read_text())
        assert manifest["platforms"] == list(program.platforms)
        assert manifest["needs_prng_key"] == name.endswith("sampling")
        assert manifest["max_source_length"] == models[name.split("-")[0]].config.encoder_spec.max_length
        assert manifest["jax_version"] == jax.__version__
    # the artifact folder is also a model folder
    reloaded = EncoderDecoderModel.from_pretrained(root / "bert2gpt2-beam4")
    np.testing.assert_array_equal(reloaded.params["decoder"]["embeddings"]["word"]["embedding"],
                                  models["bert2gpt2"].params["decoder"]["embeddings"]["word"]["embedding"])


def test_source_length_floor_for_encoder_ngram_ban(exported, tmp_path):
    """The encoder n-gram ban needs sources of at least n tokens at trace time: the export constrains the
    symbolic length to that, and the artifact still gives make_generate_fn's ids (penalties on the source too)."""
    _, models, _, _ = exported
    model = models["bert2bert"]
    config = model.generation_config.replace(max_new_tokens=MAX_NEW_TOKENS, num_beams=2, num_return_sequences=2,
                                             encoder_no_repeat_ngram_size=2, encoder_repetition_penalty=3.0)
    export_generate(model, config, folder=tmp_path / "ngram", max_source_length=16)
    generate = load_generate(tmp_path / "ngram")
    ids, mask = _inputs()["3x9"]
    np.testing.assert_array_equal(generate(ids, mask),
                                  make_generate_fn(model.config, config)(model.params, ids, mask, None))
    with pytest.raises(ValueError, match=r"1 column\(s\); this artifact takes 2 to 16 \(its max_source_length and "
                                         r"encoder_no_repeat_ngram_size=2\)"):
        generate(ids[:, :1], mask[:, :1])
    with pytest.raises(ValueError, match="input_ids has 17 column"):
        generate(np.ones((1, 17), np.int32))


def test_bad_use_is_a_clear_error(exported, tmp_path):
    root, models, _, _ = exported
    model = models["bert2bert"]
    with pytest.raises(FileNotFoundError, match=f"{MANIFEST_NAME}: no exported generate function"):
        load_generate(tmp_path)
    with pytest.raises(ValueError, match="platforms must name each of cpu, cuda, rocm, tpu"):
        export_generate(model, platforms=("gpu",))
    with pytest.raises(ValueError, match="max_source_length must be an integer from 1 to 64"):
        export_generate(model, max_source_length=65)
    with pytest.raises(GenerationConfigError, match="return_dict_in_generate=False"):
        export_generate(model, return_dict_in_generate=True)

    export_generate(model, max_new_tokens=2, platforms=("tpu",), folder=tmp_path / "tpu-only")
    with pytest.raises(ValueError, match="exported for tpu, but this process runs on cpu"):
        load_generate(tmp_path / "tpu-only")

    swapped = shutil.copytree(root / "bert2bert-greedy", tmp_path / "swapped")
    shutil.copy(root / "bert2gpt2-greedy" / "flax_model.msgpack", swapped / "flax_model.msgpack")
    with pytest.raises(ValueError, match="parameter tree is not the one the exported program was traced with"):
        load_generate(swapped)

    sampling = load_generate(root / "bert2bert-sampling")
    ids, mask = _inputs()["3x9"]
    with pytest.raises(ValueError, match="pass prng_key"):
        sampling(ids, mask)
    with pytest.raises(ValueError, match=re.escape("raw uint32[2] data, got int64[3]")):
        sampling(ids, mask, np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="token id 500 outside the vocabulary"):
        sampling(np.full((1, 4), 500), prng_key=jax.random.key(0))
    # raw key data is the same key
    np.testing.assert_array_equal(sampling(ids, mask, jax.random.key(SEED)),
                                  sampling(ids, mask, jax.random.key_data(jax.random.key(SEED))))


def test_cli_export_prints_size_platforms_and_load_time(hf_folders, tmp_path, minilm_path):
    """... and writes the model's tokenizer beside the program, so that a server needs that folder alone."""
    model = tmp_path / "model"
    shutil.copytree(hf_folders["bert2gpt2"], model)
    Tokenizer.from_pretrained(minilm_path).save_pretrained(model)  # a tokenizer exported with the model
    out = tmp_path / "served"
    proc = subprocess.run([sys.executable, "-m", "jaxencdec.cli", "export", str(model), str(out),
                           "--num-beams", "2", "--max-new-tokens", "3", "--max-source-length", "16"],
                          capture_output=True, text=True, timeout=600, env=_fresh_python_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(rf"wrote {re.escape(str(out))}: {EXPORTED_NAME} \d+\.\d\d MiB", lines[0]), lines
    assert "platforms: cpu, cuda, tpu" in lines
    assert any(line.startswith("signature: input_ids int32[batch, source_length], attention_mask int32[batch, "
                               "source_length], prng_key uint32[2] -> int32[batch, 4]; source_length 1..16; "
                               "prng_key ignored") for line in lines), lines
    assert re.fullmatch(r"load: \d+\.\d\d s, first call \(cpu, dummy batch of 1 x 1, compiles\): \d+\.\d\d s",
                        lines[-1]), lines
    assert load_generate(out).manifest["generation_config"]["num_beams"] == 2
    assert "tokenizer: tokenizer.json (Tokenizer.from_pretrained(OUT))" in lines
    text = "the served tokenizer"
    np.testing.assert_array_equal(Tokenizer.from_pretrained(out)(text)["input_ids"],
                                  Tokenizer.from_pretrained(minilm_path)(text)["input_ids"])


def test_export_to_the_bucket_and_serve_from_it(hf_folders, gcs_bucket, gcs_emulator):
    """The serving artifact written to and loaded from gs:// (as a pod-slice job hands it to a server)."""
    model = EncoderDecoderModel.from_pretrained(hf_folders["bert2gpt2"])
    config = model.generation_config.replace(num_beams=2, max_new_tokens=4)
    url = f"{gcs_bucket}/served"
    export_generate(model, config, folder=url)
    assert {"generate.jax_export", "generate_export.json", "flax_model.msgpack"} <= set(paths.list_names(url))
    served = load_generate(url)
    ids = np.array([[101, 7, 8, 9, 102], [101, 5, 102, 0, 0]], np.int32)
    mask = (ids != 0).astype(np.int32)
    expected = make_generate_fn(model.config, config)(model.params, ids, mask, None)
    np.testing.assert_array_equal(np.asarray(served(ids, mask)), np.asarray(expected))

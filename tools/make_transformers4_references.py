"""Computes the transformers 4 references that tests/test_relative_positions.py checks jaxencdec against, into
tests/references/transformers4/ (replaced whole); run from the repository root, in the test environment
(jaxencdec, torch), with the package index reachable:

    python tools/make_transformers4_references.py

transformers 5 removed relative position embeddings in BERT and RoBERTa (``position_embedding_type=
"relative_key"`` / ``"relative_key_query"``) and ``tie_encoder_decoder``; transformers 4.57.3 still has both, so
it is the reference for them. The tool pip-installs it (with the huggingface-hub and tokenizers it needs, and
whatever else they require that this environment lacks) into a temporary folder, not into the environment, and
runs the computation in a subprocess whose ``PYTHONPATH`` puts that folder first: there transformers 4 shadows the
environment's transformers 5, while torch, numpy and safetensors come from the environment. The models, inputs
and settings are those of tests/transformers4_references.py. It writes:

- ``<pair>/`` for each relative pair, and ``tied/`` (a tied relative bert2bert): ``config.json``,
  ``generation_config.json`` and ``model.safetensors`` as transformers 4's ``save_pretrained`` writes them.
- ``outputs.npz``, arrays named ``model|output``: each pair's logits, loss and attentions (``use_cache=False``),
  logits with the default ``use_cache=True`` (pairs with a relative_key_query decoder), gradients (BERT pairs),
  greedy ids (pairs with a relative_key decoder), beams and their scores; the tied model's logits, then its losses,
  logits and beams after SGD steps; ``inputs|name`` the inputs all of them were computed on.
- ``metadata.json``: the transformers version, this command, the settings, and how transformers 4 loads the
  trained tied model from its own save and from that save with each tensor ``tie_encoder_decoder`` shares also
  under its encoder name (as jaxencdec's ``export_pytorch`` writes it): the tensor names of the latter, the names
  that share one tensor once loaded, the full config, what the loader reported. The tool stops unless both load
  tied, with nothing missing or unexpected, the trained model's logits and the same beams.
- ``README.md``: what the folder is, and this command.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PINS = ("transformers==4.57.3", "huggingface-hub==0.36.0", "tokenizers==0.22.1")
VERSION = "4.57.3"
TESTS = Path(__file__).resolve().parent.parent / "tests"
README = """# transformers 4 references

Computed by transformers {version} (with {pins}) for `tests/test_relative_positions.py`:
transformers 5 removed relative position embeddings in BERT and RoBERTa and `tie_encoder_decoder`.
`tests/transformers4_references.py` defines the models, inputs and settings; the docstring of
`tools/make_transformers4_references.py` lists the files. To regenerate them, from the repository root (the tool
installs transformers 4 into a temporary folder, from the package index):

    {command}
"""


def pip_install(target: Path, requirements: list[str]) -> None:
    """``pip install --no-deps --target target requirements``; exits with pip's own words when it fails."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--target", str(target), *requirements]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        sys.exit(f"pip could not install {' '.join(requirements)} (is the package index reachable?):\n"
                 f"{result.stderr[-3000:]}")


def unmet(target: Path) -> list[str]:
    """The requirements of the distributions in ``target`` that neither ``target`` nor this environment meets
    (transformers 4 imports packages, such as ``requests``, that transformers 5 no longer needs)."""
    dists = list(importlib.metadata.distributions(path=[str(target)]))
    installed = {canonicalize_name(d.metadata["Name"]) for d in dists}
    missing = set()
    for requirement in (Requirement(line) for d in dists for line in d.requires or ()):
        if canonicalize_name(requirement.name) in installed or (
                requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        try:
            met = requirement.specifier.contains(importlib.metadata.version(requirement.name), prereleases=True)
        except importlib.metadata.PackageNotFoundError:
            met = False
        if not met:
            missing.add(f"{requirement.name}{requirement.specifier}")
    return sorted(missing)


def install(site: Path) -> None:
    """The pinned transformers 4 stack into ``site``, and what it requires that this environment lacks."""
    requirements = list(PINS)
    for _ in range(5):  # each round installs what the previous round's packages require
        pip_install(site, requirements)
        requirements = unmet(site)
        if not requirements:
            return
    sys.exit(f"transformers 4's requirements keep growing: {requirements}")


def compute(work: Path) -> None:
    """The subprocess: reads ``settings.json`` and ``inputs.npz`` in ``work``, writes the models and
    ``outputs.npz`` into ``work/references`` and the tied model's loading facts into ``work/tied.json``."""
    # Imported here, where transformers 4 comes first on the path; the parent process imports transformers 5.
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    from hf_reference import EOS, PAD, SMALL, START, randomize_

    assert transformers.__version__ == VERSION, ("transformers 4 is not the one imported", transformers.__file__)
    settings = json.loads((work / "settings.json").read_text())
    with np.load(work / "inputs.npz") as data:
        arrays = {name: data[name] for name in data.files}
    t = {name: torch.tensor(array) for name, array in arrays.items()}
    out = {f"inputs|{name}": array for name, array in arrays.items()}
    references = work / "references"

    def build(arch, encoder_type, decoder_type, seed, **kwargs):
        parts = [SMALL[arch](settings["hidden"]) for _ in range(2)]
        for part, kind in zip(parts, (encoder_type, decoder_type)):
            part.position_embedding_type, part.max_position_embeddings = kind, settings["max_positions"]
        config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(*parts, **kwargs)
        config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = START, PAD, EOS
        torch.manual_seed(seed)
        return randomize_(transformers.EncoderDecoderModel(config=config), seed)

    def forward(model, **kwargs):
        return model(input_ids=t["ids"], attention_mask=t["mask"], labels=t["labels"], **kwargs)

    def generate(model, **kwargs):
        return model.generate(input_ids=t["gen_ids"], attention_mask=t["gen_mask"], **settings["generate"], **kwargs)

    for name, (arch, encoder_type, decoder_type, seed) in settings["pairs"].items():
        model = build(arch, encoder_type, decoder_type, seed)
        model.save_pretrained(references / name)
        with torch.no_grad():
            result = forward(model, use_cache=False, output_attentions=True)
            out[f"{name}|logits"], out[f"{name}|loss"] = result.logits.numpy(), result.loss.numpy()
            for field in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
                out[f"{name}|{field}"] = torch.stack(getattr(result, field)).numpy()
            if name in settings["use_cache"]:
                out[f"{name}|logits_use_cache"] = forward(model).logits.numpy()
            if name in settings["greedy"]:
                out[f"{name}|greedy"] = generate(model).numpy()
            beams = generate(model, **settings["beams"], return_dict_in_generate=True, output_scores=True)
            out[f"{name}|beams"], out[f"{name}|beam_scores"] = beams.sequences.numpy(), beams.sequences_scores.numpy()
        if name in settings["gradients"]:
            model.zero_grad()
            forward(model, use_cache=False).loss.backward()
            out.update({f"{name}|grad|{p}": v.grad.numpy() for p, v in model.named_parameters() if v.grad is not None})

    # The tied bert2bert (transformers 4 ties at construction), saved untrained, then trained by SGD as the test
    # trains it.
    model = build(*settings["tied"], tie_encoder_decoder=True)
    assert model.encoder.embeddings.word_embeddings.weight is model.decoder.bert.embeddings.word_embeddings.weight
    model.save_pretrained(references / "tied")
    with torch.no_grad():
        out["tied|logits"] = forward(model, use_cache=False).logits.numpy()
    optimizer = torch.optim.SGD(model.parameters(), lr=settings["learning_rate"])
    losses = []
    for _ in range(settings["train_steps"]):
        optimizer.zero_grad()
        logits = model(input_ids=t["train_ids"], attention_mask=t["train_mask"],
                       decoder_input_ids=t["train_decoder_ids"], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 t["train_labels"].reshape(-1), ignore_index=-100)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    out["tied|train_losses"] = np.array(losses)
    with torch.no_grad():
        trained = forward(model, use_cache=False).logits
    out["tied|trained_logits"] = trained.numpy()

    # How transformers 4 loads a tied model: from its own save (each shared tensor under its decoder name), and
    # from that save plus each tensor tie_encoder_decoder shares under its encoder name too (the encoder names
    # transformers 4 lists as dynamically tied), the form of jaxencdec's export.
    model.save_pretrained(work / "own")
    both = {**load_file(work / "own" / "model.safetensors"),
            **{name: model.state_dict()[name].clone() for name in model._dynamic_tied_weights_keys}}
    shutil.copytree(work / "own", work / "both")
    save_file(both, work / "both" / "model.safetensors", metadata={"format": "pt"})

    def reload(folder):
        """(what ``from_pretrained(folder)`` reported, the names that share one tensor, the full config), and the
        beams of the model loaded, which must be tied and give the trained logits."""
        loaded, info = transformers.EncoderDecoderModel.from_pretrained(work / folder, output_loading_info=True)
        loaded.eval()
        by_tensor = {}
        for name, parameter in loaded.named_parameters(remove_duplicate=False):
            by_tensor.setdefault(id(parameter), []).append(name)
        shared = sorted(sorted(names) for names in by_tensor.values() if len(names) > 1)
        # Every encoder tensor but the pooler's weight and bias is the decoder's.
        encoder_tensors = len(dict(loaded.encoder.named_parameters()))
        assert sum(any(n.startswith("encoder.") for n in names) for names in shared) == encoder_tensors - 2, shared
        with torch.no_grad():
            assert torch.equal(forward(loaded, use_cache=False).logits, trained), folder
            beams = generate(loaded, **settings["beams"]).numpy()
        config = json.loads(loaded.config.to_json_string(use_diff=False))
        del config["_name_or_path"]  # the temporary folder it was loaded from
        report = dict(missing=info["missing_keys"], unexpected=info["unexpected_keys"],
                      tie_encoder_decoder=loaded.config.tie_encoder_decoder)
        return dict(loading=report, shared=shared, config=config), beams

    (own, own_beams), (tied, beams) = reload("own"), reload("both")
    assert tied == own and tied["loading"] == dict(missing=[], unexpected=[], tie_encoder_decoder=True), tied
    np.testing.assert_array_equal(beams, own_beams)
    out["tied|trained_beams"] = beams
    (work / "tied.json").write_text(json.dumps(dict(keys=sorted(both), **tied)))
    np.savez_compressed(references / "outputs.npz", **out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compute", metavar="FOLDER", help=argparse.SUPPRESS)  # the subprocess's entry
    args = p.parse_args(argv)
    if args.compute:
        compute(Path(args.compute))
        return
    # Imported here, not at the top: the subprocess runs this file too, and imports transformers in compute() only,
    # with transformers 4 first on its path (transformers4_references imports it, through hf_reference).
    sys.path.insert(0, str(TESTS))
    from transformers4_references import FOLDER, REGENERATE, inputs, settings

    with tempfile.TemporaryDirectory(prefix="transformers4-") as tmp:
        site, work = Path(tmp) / "site", Path(tmp) / "work"
        print(f"installing {', '.join(PINS)} into {site}", flush=True)
        install(site)
        (work / "references").mkdir(parents=True)
        np.savez(work / "inputs.npz", **inputs())
        (work / "settings.json").write_text(json.dumps(settings()))
        # transformers 4's code warns (a tensor copy torch frowns upon, its deprecated decoder_input_ids path);
        # the references do not depend on it.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(TESTS)]), "TRANSFORMERS_VERBOSITY": "error",
               "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        print("computing the references with transformers", VERSION, flush=True)
        subprocess.run([sys.executable, __file__, "--compute", str(work)], env=env, check=True)
        metadata = dict(transformers=VERSION, pins=PINS, command=REGENERATE, settings=settings(),
                        tied=json.loads((work / "tied.json").read_text()))
        (work / "references" / "metadata.json").write_text(json.dumps(metadata, indent=1) + "\n")
        (work / "references" / "README.md").write_text(
            README.format(version=VERSION, pins=", ".join(PINS[1:]), command=REGENERATE))
        shutil.rmtree(FOLDER, ignore_errors=True)
        shutil.copytree(work / "references", FOLDER)
    for path in sorted(FOLDER.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:>9,}  {path.relative_to(FOLDER.parent.parent.parent)}")
    print(f"{sum(p.stat().st_size for p in FOLDER.rglob('*') if p.is_file()):>9,}  in all")


if __name__ == "__main__":
    main()

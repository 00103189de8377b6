"""Command line: `gptkernels {info,prepare,train,generate,finetune,bench}` (also `python -m gptkernels ...`).

Bad arguments and unusable inputs end with one line, `gptkernels <command>: error: ...`, and a
non-zero exit status (set GPTKERNELS_DEBUG=1 for the traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from gptkernels.gpt.device import DEVICE_HELP

EXIT_USAGE = 2
EXIT_ERROR = 1


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus the pointer to --help), not the usage block."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return v


# ---- info ------------------------------------------------------------------------------------

def _cmd_info(args) -> int:
    from gptkernels._info import info
    info()
    return 0


# ---- prepare ---------------------------------------------------------------------------------

def _cmd_prepare(args) -> int:
    from gptkernels.gpt.data import prepare
    if args.tokenizer and args.vocab_size is not None:
        raise ValueError("--vocab-size and --tokenizer exclude each other (the tokenizer fixes the vocabulary)")
    prepare(args.inputs, args.out, vocab_size=args.vocab_size or 8192, tokenizer=args.tokenizer,
            val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, max_bytes=args.max_bytes,
            tokenizer_train_bytes=args.tokenizer_train_bytes, text_field=args.text_field,
            progress=not args.no_progress, overwrite=args.overwrite)
    return 0


def _add_prepare(sub):
    p = sub.add_parser("prepare", help="tokenize a text corpus into token shards (trains a BPE tokenizer)",
                       description="Text files or folders (UTF-8 .txt/.md/.py/..., or .jsonl with a text field) -> "
                                   "a byte-level BPE tokenizer (trained here, or an existing tokenizer.json) -> token "
                                   "shards with a train/val split in --out.")
    p.add_argument("inputs", nargs="+", help="files and/or folders (folders are searched recursively)")
    p.add_argument("--out", required=True, help="output folder for meta.json, tokenizer.json and the shards")
    p.add_argument("--vocab-size", type=_positive_int, default=None, help="BPE vocabulary to train (default 8192)")
    p.add_argument("--tokenizer", help="use this tokenizer (tokenizer.json, or a folder with tokenizer.json or "
                                       "vocab.json + merges.txt) instead of training one")
    p.add_argument("--val-fraction", type=_nonneg_float, default=0.01, help="share of the text held out (default 0.01)")
    p.add_argument("--shard-tokens", type=_positive_int, default=100_000_000, help="tokens per shard file")
    p.add_argument("--max-bytes", type=_positive_int, default=None, help="use only the first N bytes of the corpus")
    p.add_argument("--tokenizer-train-bytes", type=_positive_int, default=200_000_000,
                   help="train the tokenizer on the first N bytes (default 200 MB)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=_cmd_prepare)


# ---- train -----------------------------------------------------------------------------------

_TRAIN_HELP = {
    "data": "dataset folder from `gptkernels prepare` (default: the bundled Python-stdlib corpus)",
    "corpus": "bundled corpus when --data is not given: stdlib (~30 MB) or stdlib-small (~5 MB)",
    "n_layer": "transformer blocks", "n_head": "attention heads", "n_kv_head": "key/value heads (grouped-query)",
    "n_embd": "model width", "block_size": "context length T", "dropout": "dropout probability",
    "bias": "biases in Linear and LayerNorm", "activation": "gelu_tanh, gelu or relu",
    "pos_embedding": "learned or sinusoidal", "tie_embeddings": "share the LM head with the token embedding",
    "pad_vocab": "pad the vocabulary to a multiple of this",
    "batch_size": "sequences per micro-batch per process",
    "tokens_per_step": "global tokens per optimizer step (gradient accumulation makes up the rest)",
    "max_steps": "optimizer steps", "lr": "peak learning rate", "min_lr_ratio": "final lr as a fraction of --lr",
    "warmup_steps": "linear warm-up steps", "weight_decay": "AdamW weight decay (matrices only)",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2", "grad_clip": "max gradient norm (0: off)",
    "eval_interval": "validate every N steps", "eval_samples": "validation sequences per evaluation",
    "sample_interval": "print a sample every N steps (0: at the end only)", "sample_tokens": "tokens per sample",
    "sample_prompt": "prompt for the samples", "log_interval": "log every N steps",
    "progress": "tqdm progress bar (else a line per log interval)", "out_dir": "run folder (checkpoint, metrics, plot)",
    "ckpt_interval": "checkpoint every N steps", "resume": "continue from out_dir/ckpt.pt",
    "stop_at": "stop (with a checkpoint) after this step, as if interrupted",
    "device": DEVICE_HELP, "dtype": "auto (bf16 autocast on GPU), float32 or bfloat16",
    "backend": "gptkernels ops: auto, kernel or reference", "compile": "torch.compile the model",
    "compile_mode": "torch.compile mode (e.g. reduce-overhead: CUDA graphs, max-autotune)",
    "fsdp": "shard parameters, gradients and optimizer state with FSDP2 (under torchrun)",
    "seed": "random seed (weights, data order, dropout)", "verify_data": "CRC-check the shards at start",
    "peak_tflops": "peak TFLOP/s for MFU (default: from the GPU name)",
}


def _add_train(sub):
    from gptkernels.gpt.train import PRESETS, TrainConfig
    p = sub.add_parser("train", help="pretrain a GPT (one process, or under torchrun for many GPUs/nodes)",
                       description="Pretrain a GPT with the next-token objective. Options left out come from "
                                   "--preset. Without --data: the bundled Python-stdlib corpus. Multi-GPU: torchrun --nproc_per_node=8 "
                                   "-m gptkernels train ...",
                       epilog="presets (any option above overrides them):\n" + "\n".join(
                           f"  {name:<12} " + ", ".join(f"{k}={v}" for k, v in vals.items() if k != "out_dir")
                           for name, vals in PRESETS.items()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="auto", choices=["auto"] + sorted(PRESETS),
                   help="starting configuration; auto: gpt2 (124M) on a GPU, demo (1M, minutes) on a CPU")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "inject_nan_at":
            p.add_argument("--inject-nan-at", type=_positive_int, default=None, help=argparse.SUPPRESS)
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        kw = {"default": None, "help": _TRAIN_HELP.get(f.name, f.name)}
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind.startswith("int"):
            p.add_argument(flag, type=int, **kw)
        elif kind.startswith("float"):
            p.add_argument(flag, type=float, **kw)
        else:
            if f.name == "corpus":
                kw["choices"] = ["stdlib", "stdlib-small"]
            if f.name == "dtype":
                kw["choices"] = ["auto", "float32", "bfloat16"]
            if f.name == "backend":
                kw["choices"] = ["auto", "kernel", "reference"]
            p.add_argument(flag, type=str, **kw)
    p.set_defaults(fn=_cmd_train)


def _cmd_train(args) -> int:
    from gptkernels.gpt.train import TrainConfig, train
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    if args.data is not None and not os.path.exists(args.data):
        raise FileNotFoundError(f"--data: no such dataset folder: {args.data}")
    preset = args.preset
    if preset == "auto":
        import torch
        preset = "gpt2" if torch.cuda.is_available() else "demo"
        print(f"preset: {preset} ({'a GPU is' if preset == 'gpt2' else 'no GPU'} available; choose with --preset)",
              file=sys.stderr)
    cfg = TrainConfig.from_preset(preset, **overrides)
    res = train(cfg)
    return 130 if res.stopped == "interrupted" else 0


# ---- generate --------------------------------------------------------------------------------

def _cmd_generate(args) -> int:
    import torch

    from gptkernels.gpt.checkpoint import load_model
    from gptkernels.gpt.device import autocast, resolve_device
    device = resolve_device(args.device)
    model, tok, kind = load_model(args.source, device)
    prompt_ids = tok.encode(args.prompt)
    prepended = kind == "ckpt" or not prompt_ids
    if prepended:
        prompt_ids = [tok.eos_id] + prompt_ids  # our training documents start with end-of-text
    T = model.config.block_size
    if len(prompt_ids) >= T:
        raise ValueError(f"--prompt: {len(prompt_ids)} tokens, the model's context is {T}")
    n = min(args.max_new_tokens, T - len(prompt_ids))
    idx = torch.tensor([prompt_ids] * args.num_samples, device=device)
    with autocast(device):
        out = model.generate(idx, n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             eos_token_id=tok.eos_id if args.stop_at_eos else None, seed=args.seed)
    for i, row in enumerate(out.tolist()):
        new = row[len(prompt_ids):]
        if args.stop_at_eos and tok.eos_id in new:
            new = new[:new.index(tok.eos_id)]
        ids = row[1 if prepended else 0:len(prompt_ids)] + [t for t in new if t < tok.vocab_size]
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(tok.decode(ids))
    return 0


def _add_generate(sub):
    p = sub.add_parser("generate", help="sample text from a checkpoint or a Hugging Face GPT-2 folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="ckpt.pt, a run folder holding one, or a Hugging Face GPT-2 folder")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=200)
    p.add_argument("--temperature", type=_nonneg_float, default=0.8, help="0 picks the most likely token")
    p.add_argument("--top-k", type=_positive_int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set with this probability")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=_positive_int, default=1)
    p.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="end a sample at the end-of-text token")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(fn=_cmd_generate)


# ---- finetune --------------------------------------------------------------------------------

def _add_finetune(sub):
    from gptkernels.gpt import finetune as ft
    p = sub.add_parser("finetune", help="train a classification head on labelled text; reports accuracy",
                       description=ft.__doc__.split("\n\n")[0] + " " + ft.DEFAULT_SET_DESCRIPTION,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="training examples: .jsonl ({text, label} per line) or .csv (text,label header); "
                                  "default: the bundled standard-library set")
    p.add_argument("--eval-data", help="evaluation examples (default: 20%% of --data held out)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--init", help="body to start from: a pretraining checkpoint (ckpt.pt or its run folder) or a "
                                  "Hugging Face GPT-2 folder (default: a fresh small GPT)")
    p.add_argument("--epochs", type=_positive_int, default=3)
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--lr", type=_nonneg_float, default=3e-4)
    p.add_argument("--max-len", type=_positive_int, default=128, help="tokens per example (longer ones are cut)")
    p.add_argument("--freeze-body", action="store_true", help="train only the classification head")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="save the fine-tuned classifier here (.pt)")
    p.set_defaults(fn=_cmd_finetune)


def _cmd_finetune(args) -> int:
    from gptkernels.gpt import finetune as ft
    from gptkernels.gpt.device import resolve_device
    if args.data is None:
        if args.eval_data:
            raise ft.FinetuneError("--eval-data needs --data")
        train_set, eval_set = ft.bundled_labelled_set(seed=args.seed)
        print(f"data: the bundled set ({ft.DEFAULT_SET_DESCRIPTION.split(': ', 1)[1]})", file=sys.stderr)
    else:
        train_set = ft.read_labelled(args.data, args.text_field, args.label_field)
        eval_set = ft.read_labelled(args.eval_data, args.text_field, args.label_field) if args.eval_data else None
    res = ft.finetune(train_set, eval_set, init=args.init, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, max_len=args.max_len, freeze_body=args.freeze_body,
                      device=resolve_device(args.device), seed=args.seed, out=args.out)
    print(f"accuracy: {100 * res['accuracy']:.1f}% on {res['n_eval']} held-out examples, {len(res['labels'])} classes "
          f"(majority-class baseline {100 * res['majority_baseline']:.1f}%)")
    return 0


# ---- bench -----------------------------------------------------------------------------------

def _add_bench(sub):
    p = sub.add_parser("bench", help="run the benchmarks (python -m benchmarks.run); --e2e: the training benchmark",
                       add_help=True)
    p.add_argument("--e2e", action="store_true", help="run benchmarks.e2e_train instead of the per-op benchmarks")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed on (e.g. --quick --ops attention)")
    p.set_defaults(fn=_cmd_bench)


def _cmd_bench(args) -> int:
    import importlib
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.isdir(os.path.join(root, "benchmarks")):
        raise FileNotFoundError(f"benchmarks/ not found next to the package ({root}); run from a source checkout")
    if root not in sys.path:
        sys.path.insert(0, root)
    mod = importlib.import_module("benchmarks.e2e_train" if args.e2e else "benchmarks.run")
    rest = [a for a in args.rest if a != "--"]
    return mod.main(rest) or 0


# ---- main ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gptkernels", description="Fast GPT kernels for PyTorch: pretrain, sample, fine-tune, benchmark.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("info", help="versions, GPU, extension build and which ops use kernels").set_defaults(fn=_cmd_info)
    _add_prepare(sub)
    _add_train(sub)
    _add_generate(sub)
    _add_finetune(sub)
    _add_bench(sub)
    from gptkernels._selftest import add_parser as add_selftest_parser
    add_selftest_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from gptkernels.gpt.data import DataError
    from gptkernels.gpt.tokenizer import TokenizerError
    from gptkernels.gpt.train import TrainError
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (DataError, TokenizerError, TrainError, FileNotFoundError, IsADirectoryError, PermissionError,
            ValueError) as e:
        if os.environ.get("GPTKERNELS_DEBUG") == "1":
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, (FileNotFoundError, PermissionError)) and e.filename and e.filename not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"gptkernels {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_ERROR

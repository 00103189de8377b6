"""Command line: `gptkernels {info,prepare,train,generate,finetune,bench}` (also `python -m gptkernels ...`).

Bad arguments and unusable inputs end with one line, `gptkernels <command>: error: <what> (<path>)`,
and exit status 2 (a bad argument) or 1 (anything else); set GPTKERNELS_DEBUG=1 for the traceback.
Every numeric option is range-checked while parsing (gptkernels/gpt/limits.py), text options must
be valid UTF-8, and the files a command writes are checked before it loads data or models.
The one place that turns an exception into that line is main() with errors.describe().
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from gptkernels.gpt.cli_args import (Help as _Help, Parser as _Parser, device as _device, num as _num, text as _text,
                                     window as _window)
from gptkernels.gpt.device import DEVICE_HELP
from gptkernels.gpt.errors import UsageError, cli_error, describe, env_flag


# ---- info ------------------------------------------------------------------------------------

def _setting_errors() -> list[str]:
    """Every environment variable of the package read and checked, as first use would: their errors."""
    from gptkernels import _backend
    from gptkernels.gpt.data import cache_dir
    from gptkernels.ops import loss as ops_loss
    errs = []
    for check in (_backend.get_backend, ops_loss.get_target_check, lambda: env_flag("GPTKERNELS_DEBUG"), cache_dir):
        try:
            check()
        except ValueError as e:
            errs.append(str(e))
    return errs


def _cmd_info(args) -> int:
    from gptkernels._info import info
    info()
    errs = _setting_errors()
    if errs:
        raise ValueError("; ".join(errs))
    return 0


# ---- prepare ---------------------------------------------------------------------------------

def _cmd_prepare(args) -> int:
    from gptkernels.gpt.data import prepare
    if args.tokenizer and args.vocab_size is not None:
        raise UsageError("--vocab-size and --tokenizer exclude each other (the tokenizer fixes the vocabulary)")
    prepare(args.inputs, args.out, vocab_size=args.vocab_size or 8192, tokenizer=args.tokenizer,
            val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, max_bytes=args.max_bytes,
            tokenizer_train_bytes=args.tokenizer_train_bytes, text_field=args.text_field,
            progress=not args.no_progress, overwrite=args.overwrite)
    return 0


def _add_prepare(sub):
    p = sub.add_parser("prepare", help="tokenize a text corpus into token shards (trains a BPE tokenizer)",
                       formatter_class=_Help,
                       description="Text files or folders (UTF-8 .txt/.md/.py/..., or .jsonl with a text field) -> "
                                   "a byte-level BPE tokenizer (trained here, or an existing tokenizer.json) -> token "
                                   "shards with a train/val split in --out.")
    p.add_argument("inputs", nargs="+", help="files and/or folders (folders are searched recursively)")
    p.add_argument("--out", required=True, help="output folder for meta.json, tokenizer.json and the shards")
    p.add_argument("--vocab-size", type=_num("int>=1"), default=None, help="BPE vocabulary to train (default: 8192)")
    p.add_argument("--tokenizer", help="use this tokenizer (tokenizer.json, or a folder with "
                                                   "tokenizer.json or vocab.json + merges.txt) instead of training one")
    p.add_argument("--val-fraction", type=_num("[0,1)"), default=0.01,
                   help="share of the tokens held out for validation; a small corpus gets at least "
                        "min(1024 tokens, 10%%) (default: 0.01)")
    p.add_argument("--shard-tokens", type=_num("int>=1"), default=100_000_000, help="tokens per shard file")
    p.add_argument("--max-bytes", type=_num("int>=1"), default=None, help="use only the first N bytes of the corpus")
    p.add_argument("--tokenizer-train-bytes", type=_num("int>=1"), default=200_000_000,
                   help="train the tokenizer on the first N bytes of the corpus")
    p.add_argument("--text-field", type=_text, default="text", help="JSONL field holding the text")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=_cmd_prepare)


# ---- train -----------------------------------------------------------------------------------

_TRAIN_HELP = {
    "data": "dataset folder from `gptkernels prepare` (default: the bundled Python-stdlib corpus)",
    "corpus": "bundled corpus when --data is not given: stdlib (~30 MB) or stdlib-small (~5 MB)",
    "n_layer": "transformer blocks", "n_head": "attention heads", "n_kv_head": "key/value heads (grouped-query)",
    "n_embd": "model width", "block_size": "context length T", "dropout": "dropout probability",
    "bias": "biases in Linear and LayerNorm", "activation": "MLP activation",
    "pos_embedding": "position embedding", "tie_embeddings": "share the LM head with the token embedding",
    "window": "sliding-window attention: W (every layer: a token sees itself and the W before it), or a "
              "comma-separated list with one entry per layer, -1 or global = full causal attention",
    "attn_softcap": "C > 0: attention scores s become C * tanh(s / C) before the softmax (0: off)",
    "document_masking": "attend within each document only (documents start at the end-of-text token; a "
                        "document split across rows is two), positions restart per document",
    "pad_vocab": "pad the vocabulary to a multiple of this (1: no padding)",
    "batch_size": "sequences per micro-batch per process",
    "tokens_per_step": "global tokens per optimizer step (gradient accumulation makes up the rest)",
    "max_steps": "optimizer steps", "lr": "peak learning rate", "min_lr_ratio": "final lr as a fraction of --lr",
    "warmup_steps": "linear warm-up steps", "weight_decay": "AdamW weight decay (matrices only)",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2", "grad_clip": "max gradient norm (0: off)",
    "eval_interval": "validate every N steps", "eval_samples": "validation sequences per evaluation",
    "sample_interval": "print a sample every N steps (0: at the end only)", "sample_tokens": "tokens per sample",
    "sample_prompt": "prompt for the samples", "log_interval": "log (and record the mean loss) every N steps",
    "progress": "tqdm progress bar (else a line per log interval)", "out_dir": "run folder (checkpoint, metrics, plot)",
    "ckpt_interval": "checkpoint every N steps", "resume": "continue from out_dir/ckpt.pt",
    "stop_at": "stop (with a checkpoint) after this step, as if interrupted",
    "device": DEVICE_HELP, "dtype": "auto: bf16 autocast on GPU", "backend": "gptkernels ops",
    "compile": "torch.compile the model", "compile_mode": "torch.compile mode (reduce-overhead: CUDA graphs)",
    "fsdp": "shard parameters, gradients and optimizer state with FSDP2 (under torchrun)",
    "seed": "random seed (weights, data order, dropout)",
    "verify_data": "CRC-check the shards at start (token ids are checked either way)",
    "verify_checkpoint": "check the checksums of the checkpoint resumed from",
    "force": "start a CPU run even when its memory estimate exceeds the available memory",
    "peak_tflops": "peak TFLOP/s for MFU (default: from the GPU name)",
}


def _train_default(name: str, default) -> str:
    """ "(default: X; presets: demo Y, ...)" for an option of `train`."""
    from gptkernels.gpt.train import PRESETS
    shown = "off" if default is None else "empty" if default == "" else default
    per = [f"{p} {v[name]}" for p, v in PRESETS.items() if name in v and v[name] != default]
    return f" (default: {shown}" + (f"; presets: {', '.join(per)})" if per else ")")


def _add_train(sub):
    from gptkernels.gpt.train import PRESETS, TrainConfig
    from gptkernels.gpt.train.config import CHOICES, LIMITS
    p = sub.add_parser("train", help="pretrain a GPT (one process, or under torchrun for many GPUs/nodes)",
                       description="Pretrain a GPT with the next-token objective. Options left out come from "
                                   "--preset. Without --data: the bundled Python-stdlib corpus. Multi-GPU: torchrun "
                                   "--nproc_per_node=8 -m gptkernels train ...",
                       epilog="presets (any option above overrides them):\n" + "\n".join(
                           f"  {name:<12} " + ", ".join(f"{k}={v}" for k, v in vals.items() if k != "out_dir")
                           for name, vals in PRESETS.items()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="auto", choices=["auto"] + sorted(PRESETS),
                   help="starting configuration; auto: gpt2 (124M) on a GPU, demo (1M, minutes) on a CPU "
                        "(default: auto)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "inject_nan_at":
            p.add_argument(flag, type=_num("int>=1"), default=None, help=argparse.SUPPRESS)
            continue
        help_ = _TRAIN_HELP.get(f.name, f.name)
        if "default" not in help_:
            help_ += _train_default(f.name, f.default)
        kw = {"default": None, "help": help_, "dest": f.name}
        if f.name in LIMITS:
            p.add_argument(flag, type=_num(LIMITS[f.name][0]), **kw)
        elif f.name in CHOICES:
            p.add_argument(flag, choices=[c for c in CHOICES[f.name] if c is not None], **kw)
        elif isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:  # text: the sample prompt and the device must be valid UTF-8; paths may be any bytes
            p.add_argument(flag, type={"sample_prompt": _text, "device": _device, "window": _window}.get(f.name, str),
                           **kw)
    p.set_defaults(fn=_cmd_train)


def _cmd_train(args) -> int:
    from gptkernels.gpt.train import TrainConfig, train
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    if args.data is not None and not os.path.exists(args.data):
        raise FileNotFoundError(f"--data: no such dataset folder ({args.data})")
    preset = args.preset
    if preset == "auto":
        import torch
        preset = "gpt2" if torch.cuda.is_available() else "demo"
        print(f"preset: {preset} ({'a GPU is' if preset == 'gpt2' else 'no GPU'} available; choose with --preset)",
              file=sys.stderr)
    res = train(TrainConfig.from_preset(preset, **overrides))
    return 128 + int(res.signal) if res.stopped == "interrupted" and res.signal else 0


# ---- generate --------------------------------------------------------------------------------

def _cmd_generate(args) -> int:
    import torch

    from gptkernels.gpt.checkpoint import load_model
    from gptkernels.gpt.device import autocast, resolve_device
    device = resolve_device(args.device)
    model, tok, kind = load_model(args.source, device, verify=args.verify,
                                  log=lambda s: print(s, file=sys.stderr))
    prompt_ids = tok.encode(args.prompt)
    n_prompt = len(prompt_ids)
    prepended = kind == "ckpt" or not prompt_ids
    if prepended:
        prompt_ids = [tok.eos_id] + prompt_ids  # our training documents start with end-of-text
    T = model.config.block_size
    room = T - len(prompt_ids)  # new tokens that fit after the prompt
    if room < 1:
        raise UsageError(f"--prompt: {n_prompt} tokens{' (plus the end-of-text token that starts a document)' if prepended and n_prompt else ''}"
                         f", too long for the model's context of {T} tokens")
    if args.max_new_tokens is None:
        args.max_new_tokens = min(200, room)
    elif args.max_new_tokens > room:
        raise UsageError(f"--max-new-tokens: {args.max_new_tokens} new tokens after a {len(prompt_ids)}-token prompt "
                         f"exceed the model's context of {T} tokens; at most {room}")
    idx = torch.tensor([prompt_ids] * args.num_samples, device=device)
    with autocast(device):
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, eos_token_id=tok.eos_id if args.stop_at_eos else None, seed=args.seed)
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
                       formatter_class=_Help)
    p.add_argument("source", help="ckpt.pt, a run folder holding one, or a Hugging Face GPT-2 folder")
    p.add_argument("--prompt", type=_text, default="", help="text to continue (default: empty, a new document)")
    p.add_argument("--max-new-tokens", type=_num("int>=1"), default=None,
                   help="tokens to generate; the prompt plus these must fit the model's context "
                        "(default: 200, or as many as fit)")
    p.add_argument("--temperature", type=_num("float>=0"), default=0.8, help="0 picks the most likely token")
    p.add_argument("--top-k", type=_num("int>=1"), default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=_num("(0,1]"), default=None,
                   help="nucleus sampling: the smallest set with this probability")
    p.add_argument("--seed", type=_num("int>=0"), default=0, help="random seed of the sampling")
    p.add_argument("--num-samples", type=_num("int>=1"), default=1, help="samples to draw")
    p.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="end a sample at the end-of-text token")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check the checkpoint's checksums")
    p.add_argument("--device", type=_device, default="auto", help=DEVICE_HELP)
    p.set_defaults(fn=_cmd_generate)


# ---- finetune --------------------------------------------------------------------------------

def _add_finetune(sub):
    from gptkernels.gpt import finetune as ft
    p = sub.add_parser("finetune", help="train a classification head on labelled text; reports accuracy",
                       description=ft.__doc__.split("\n\n")[0] + " " + ft.DEFAULT_SET_DESCRIPTION,
                       formatter_class=_Help)
    p.add_argument("--data", help="training examples: .jsonl ({text, label} per line) or .csv "
                                              "(text,label header); default: the bundled standard-library set")
    p.add_argument("--eval-data", help="evaluation examples (default: 20%% of --data held out)")
    p.add_argument("--text-field", type=_text, default="text", help="field or column holding the text")
    p.add_argument("--label-field", type=_text, default="label", help="field or column holding the label")
    p.add_argument("--init", help="body to start from: a pretraining checkpoint (ckpt.pt or its run "
                                              "folder) or a Hugging Face GPT-2 folder (default: a fresh small GPT)")
    p.add_argument("--epochs", type=_num("int>=1"), default=3, help="passes over the training examples")
    p.add_argument("--batch-size", type=_num("int>=1"), default=16, help="examples per step")
    p.add_argument("--lr", type=_num("float>0"), default=3e-4, help="peak learning rate")
    p.add_argument("--max-len", type=_num("int>=1"), default=128, help="tokens per example (longer ones are cut)")
    p.add_argument("--freeze-body", action="store_true", help="train only the classification head")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check the checksums of the --init checkpoint")
    p.add_argument("--device", type=_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=_num("int>=0"), default=0, help="random seed (weights, order, held-out split)")
    p.add_argument("--out", help="save the fine-tuned classifier here (.pt; default: not saved)")
    p.set_defaults(fn=_cmd_finetune)


def _cmd_finetune(args) -> int:
    from gptkernels.gpt import finetune as ft
    from gptkernels.gpt import fs
    from gptkernels.gpt.device import resolve_device
    if args.out is not None:
        fs.output_file(args.out, "--out")  # before minutes of training, not after
    if args.data is None:
        if args.eval_data:
            raise UsageError("--eval-data needs --data")
        train_set, eval_set = ft.bundled_labelled_set(seed=args.seed)
        print(f"data: the bundled set ({ft.DEFAULT_SET_DESCRIPTION.split(': ', 1)[1]})", file=sys.stderr)
    else:
        train_set = ft.read_labelled(args.data, args.text_field, args.label_field)
        eval_set = ft.read_labelled(args.eval_data, args.text_field, args.label_field) if args.eval_data else None
    res = ft.finetune(train_set, eval_set, init=args.init, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, max_len=args.max_len, freeze_body=args.freeze_body,
                      device=resolve_device(args.device), seed=args.seed, out=args.out, verify=args.verify)
    print(f"accuracy: {100 * res['accuracy']:.1f}% on {res['n_eval']} held-out examples, {len(res['labels'])} classes "
          f"(majority-class baseline {100 * res['majority_baseline']:.1f}%)")
    return 0


# ---- main ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from gptkernels.gpt.cli_bench import add_bench
    p = _Parser(prog="gptkernels", description="Fast GPT kernels for PyTorch: pretrain, sample, fine-tune, benchmark.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("info", help="versions, GPU, extension build and which ops use kernels; checks the "
                                "GPTKERNELS_* settings").set_defaults(fn=_cmd_info)
    _add_prepare(sub)
    _add_train(sub)
    _add_generate(sub)
    _add_finetune(sub)
    add_bench(sub)
    from gptkernels._selftest import add_parser as add_selftest_parser
    add_selftest_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        debug = env_flag("GPTKERNELS_DEBUG")
    except ValueError as e:
        if args.command != "info":  # (info runs anyway and reports every bad setting)
            print(cli_error(args.command, str(e)), file=sys.stderr)
            return 1
        debug = False
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print(cli_error(args.command, "interrupted"), file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (every error ends in one line; describe() words it)
        if debug:
            raise
        msg, code = describe(e)
        print(cli_error(args.command, msg), file=sys.stderr)
        return code

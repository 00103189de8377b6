"""Fine-tune a GPT to classify text: `gptkernels finetune` trains GPTForSequenceClassification
(a linear head on the last real token's hidden state, plus the body unless --freeze-body) on
labelled text and reports accuracy on held-out examples.

Data: JSONL (one {"text": ..., "label": ...} per line) or CSV with a header holding text and
label columns; --eval-data for the evaluation set, else a deterministic 20% of --data is held out.
Start from a pretraining checkpoint (--init runs/demo), a Hugging Face GPT-2 folder, or, without
--init, a small randomly initialised GPT with a tokenizer trained on the training texts.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
import zlib

import torch

from gptkernels.gpt import fs, limits
from gptkernels.gpt.checkpoint import load_model, save_atomic
from gptkernels.gpt.classifier import GPTForSequenceClassification
from gptkernels.gpt.config import GPTConfig, pad_vocab
from gptkernels.gpt.data import stdlib_dir
from gptkernels.gpt.errors import file_op
from gptkernels.gpt.device import autocast
from gptkernels.gpt.generate import pad_prompts
from gptkernels.gpt.model import GPT
from gptkernels.gpt.optim import CosineSchedule, adamw
from gptkernels.gpt.tokenizer import Tokenizer

DEFAULT_PACKAGES = ("asyncio", "email", "importlib", "multiprocessing", "unittest", "xml")
DEFAULT_SET_DESCRIPTION = (
    "Without --data it uses a bundled labelled set built from local real text: 12-line snippets of the "
    "Python standard library's own source, labelled with the package they come from (" +
    ", ".join(DEFAULT_PACKAGES) + "; test folders left out); whole files are held out for evaluation, "
    "so the test snippets come from files the model never saw.")


class FinetuneError(ValueError):
    pass


# ---- data ------------------------------------------------------------------------------------

def bundled_labelled_set(lines_per_snippet: int = 12, max_per_class: int = 400, seed: int = 0):
    """(train, eval): lists of (text, label) from the standard library's packages. A file goes to
    eval when crc32(its path inside the package) % 5 == 0 (at least one file per class each way)."""
    root = stdlib_dir()
    train, evals = [], []
    for pkg in DEFAULT_PACKAGES:
        files = []
        for r, dirs, names in os.walk(os.path.join(root, pkg)):
            dirs[:] = sorted(d for d in dirs if not d.startswith("test") and d != "__pycache__")
            files += [os.path.join(r, n) for n in sorted(names) if n.endswith(".py")]
        if len(files) < 2:
            raise FinetuneError(f"the standard library at {root} lacks the package {pkg!r} needed by the bundled set")
        rel = [os.path.relpath(f, root) for f in files]
        held = [zlib.crc32(r.encode()) % 5 == 0 for r in rel]
        if not any(held):
            held[-1] = True
        if all(held):
            held[0] = False
        per = {True: [], False: []}
        for f, h in zip(files, held):
            with open(f, encoding="utf-8", errors="replace") as fh:
                lines = fh.read().splitlines()
            for i in range(0, len(lines), lines_per_snippet):
                snip = "\n".join(lines[i:i + lines_per_snippet])
                if len(snip.strip()) >= 200:
                    per[h].append((snip, pkg))
        train += per[False][:max_per_class]
        evals += per[True][:max(1, max_per_class // 4)]
    return train, evals


def read_labelled(path: str, text_field: str = "text", label_field: str = "label"):
    """[(text, label-as-string)] from a .jsonl or .csv file (UTF-8); FinetuneError naming the file
    (and line) when it is not that."""
    if os.path.isdir(path):
        raise FinetuneError(f"{path}: expected a .jsonl or .csv file, found a folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file ({path})")
    try:
        with file_op("read", path):
            out = _read_labelled(path, text_field, label_field)
    except UnicodeDecodeError as e:
        raise FinetuneError(f"{path}: not valid UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
    except csv.Error as e:
        raise FinetuneError(f"{path}: not a readable CSV file ({e})") from None
    if not out:
        raise FinetuneError(f"{path}: no examples")
    return out


def _read_labelled(path: str, text_field: str, label_field: str):
    out = []
    if path.lower().endswith((".jsonl", ".ndjson", ".json")):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise FinetuneError(f"{path}:{n}: not valid JSON") from None
                if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str) or label_field not in rec:
                    raise FinetuneError(f"{path}:{n}: expected an object with a string {text_field!r} and a {label_field!r}")
                out.append((rec[text_field], str(rec[label_field])))
    elif path.lower().endswith((".csv", ".tsv")):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
            if not reader.fieldnames or text_field not in reader.fieldnames or label_field not in reader.fieldnames:
                raise FinetuneError(f"{path}: expected a header with columns {text_field!r} and {label_field!r}, "
                                    f"got {reader.fieldnames}")
            for n, row in enumerate(reader, 2):
                if row[text_field] is None or row[label_field] is None:
                    raise FinetuneError(f"{path}:{n}: missing a column")
                out.append((row[text_field], row[label_field]))
    else:
        raise FinetuneError(f"{path}: expected a .jsonl or .csv file")
    return out


# ---- model -----------------------------------------------------------------------------------

def _load_body(init: str | None, train_texts, block_size: int, seed: int, log, verify: bool = True):
    """(GPT, tokenizer, where-from) for the classifier's body."""
    if init is None:
        tok = Tokenizer.train(iter(train_texts), vocab_size=1024)
        torch.manual_seed(seed)
        cfg = GPTConfig(vocab_size=pad_vocab(tok.vocab_size), block_size=block_size, n_layer=4, n_head=4, n_embd=128)
        return GPT(cfg), tok, "a fresh 4-layer GPT (no --init), tokenizer trained on the training texts"
    gpt, tok, kind = load_model(init, "cpu", verify=verify, log=log)
    return gpt, tok, f"{'Hugging Face GPT-2' if kind == 'hf' else 'checkpoint'} {init}"


def _encode(tok, texts, max_len: int, prepend_eos: bool):
    """Token lists cut to max_len (with the end-of-text token first when the body was pretrained
    that way), and their lengths."""
    rows = tok.encode_batch(list(texts))
    out = []
    for r in rows:
        r = ([tok.eos_id] + r) if prepend_eos else r
        out.append(r[:max_len] or [tok.eos_id])
    return out


def _batches(ids, labels, B, shuffle_seed=None):
    """(x right-padded, lengths, labels) batches of B examples, shuffled when shuffle_seed is given."""
    order = list(range(len(ids)))
    if shuffle_seed is not None:
        g = torch.Generator().manual_seed(shuffle_seed)
        order = torch.randperm(len(ids), generator=g).tolist()
    for i in range(0, len(order), B):
        sel = order[i:i + B]
        x, lens = pad_prompts([ids[j] for j in sel])
        yield x, lens, torch.tensor([labels[j] for j in sel])


def finetune(train_set, eval_set=None, init: str | None = None, epochs: int = 3, batch_size: int = 16,
             lr: float = 3e-4, weight_decay: float = 0.01, max_len: int = 128, freeze_body: bool = False,
             device: str = "cpu", seed: int = 0, out: str | None = None, log=None, verify: bool = True) -> dict:
    """Train a classifier; returns {"accuracy", "majority_baseline", "labels", "n_train", "n_eval", ...}.
    device: a torch.device or its name ("cpu", "cuda", "cuda:N"). out: where to save the classifier
    (checked to be writable before training). verify: check the --init checkpoint's checksums."""
    for name, kind, v in (("epochs", "int>=1", epochs), ("batch_size", "int>=1", batch_size), ("lr", "float>0", lr),
                          ("weight_decay", "float>=0", weight_decay), ("max_len", "int>=1", max_len)):
        limits.check(name, kind, v)
    if out:
        fs.output_file(out, "--out")
    device = torch.device(device)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if eval_set is None:  # hold out a deterministic 20%
        held = [zlib.crc32(t.encode()) % 5 == 0 for t, _ in train_set]
        eval_set = [e for e, h in zip(train_set, held) if h]
        train_set = [e for e, h in zip(train_set, held) if not h]
    if not train_set or not eval_set:
        raise FinetuneError("need at least one training and one evaluation example")
    labels = sorted({lab for _, lab in train_set})
    if len(labels) < 2:
        raise FinetuneError(f"need at least 2 classes, the training data has {labels}")
    unknown = sorted({lab for _, lab in eval_set} - set(labels))
    if unknown:
        raise FinetuneError(f"evaluation labels {unknown[:5]} do not occur in the training data")
    index = {lab: i for i, lab in enumerate(labels)}

    gpt, tok, where = _load_body(init, [t for t, _ in train_set], max_len, seed, log, verify)
    max_len = min(max_len, gpt.config.block_size)
    pretrained_with_eos = init is not None
    model = GPTForSequenceClassification.from_gpt(gpt, len(labels), pad_token_id=tok.eos_id).to(device).train()
    if freeze_body:
        for p in model.gpt.parameters():
            p.requires_grad_(False)
    Xtr = _encode(tok, [t for t, _ in train_set], max_len, pretrained_with_eos)
    Ytr = [index[lab] for _, lab in train_set]
    Xev = _encode(tok, [t for t, _ in eval_set], max_len, pretrained_with_eos)
    Yev = [index[lab] for _, lab in eval_set]
    log(f"finetune: {len(labels)} classes, {len(Xtr)} train / {len(Xev)} eval examples; body: {where}"
        f"{' (frozen)' if freeze_body else ''}")

    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, lr, weight_decay, device)
    steps = epochs * math.ceil(len(Xtr) / batch_size)
    sched = CosineSchedule(opt, lr, max(1, steps // 20), steps, 0.1)
    amp = autocast(device)

    def accuracy():
        model.eval()
        right = 0
        with torch.no_grad(), amp:
            for x, lens, y in _batches(Xev, Yev, 64):
                logits, _ = model(x.to(device), lengths=lens.to(device))
                right += int((logits.argmax(-1).cpu() == y).sum())
        model.train()
        return right / len(Xev)

    torch.manual_seed(seed)
    t0 = time.time()
    history = []
    for ep in range(epochs):
        tot, n = 0.0, 0
        for x, lens, y in _batches(Xtr, Ytr, batch_size, shuffle_seed=seed * 1000 + ep):
            with amp:
                _, loss = model(x.to(device), y.to(device), lengths=lens.to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            tot += loss.item() * len(y)
            n += len(y)
        acc = accuracy()
        history.append({"epoch": ep + 1, "train_loss": tot / n, "eval_accuracy": acc})
        log(f"epoch {ep + 1}/{epochs}: train loss {tot / n:.4f}, eval accuracy {100 * acc:.1f}%")
    counts = [Yev.count(i) for i in range(len(labels))]
    res = {"accuracy": history[-1]["eval_accuracy"], "majority_baseline": max(counts) / len(Yev),
           "labels": labels, "n_train": len(Xtr), "n_eval": len(Xev), "history": history,
           "seconds": time.time() - t0, "body": where}
    if out:
        save_atomic({"format": "gptkernels-classifier", "model": {k: v.cpu() for k, v in model.state_dict().items()},
                     "model_config": gpt.config.to_dict(), "labels": labels, "pad_token_id": tok.eos_id,
                     "tokenizer": tok.to_json_str(), "accuracy": res["accuracy"]}, out, "the classifier")
        res["checkpoint"] = out
    return res

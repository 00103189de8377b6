"""The command line: --help everywhere, one-line errors, prepare -> train -> generate -> finetune."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from gptkernels.gpt.cli import build_parser, main

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import make_tiny_dataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ["info", "prepare", "train", "generate", "finetune", "bench", "selftest"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_dataset(str(tmp_path_factory.mktemp("cli") / "ds"))


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "run")
    rc = main(["train", "--preset", "tiny", "--data", tiny_data, "--out-dir", out, "--max-steps", "6",
               "--no-progress", "--eval-interval", "3"])
    assert rc == 0
    return out


def _one_line_error(capsys, argv, code, *needles):
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(argv))
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("gptkernels"), err
    for n in needles:
        assert n in last, (n, last)
    return last


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gptkernels " + cmd)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_shows_each_default_once(cmd, capsys):
    """Every option whose default is a value says it once; none says "(default: None)"."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(getattr(a, "choices", None), dict)).choices[cmd]
    fmt = sub._get_formatter()
    for a in sub._actions:
        if not a.option_strings or a.help == argparse.SUPPRESS or a.dest == "help":
            continue
        h = fmt._get_help_string(a) % {"default": a.default, "prog": "p"} if a.help else ""
        assert "(default: None)" not in h and h.count("default") <= 1, (a.option_strings, h)
        if a.default not in (None, False) or cmd == "train":
            assert "default" in h, (a.option_strings, h)


def test_small_corpus_prepares_and_trains(tmp_path, capsys):
    """A few small files: prepare says how many val tokens there are, training runs (it used to refuse:
    the val split was just the last file)."""
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.txt").write_text("".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(40)))
    assert main(["prepare", str(src), "--out", str(tmp_path / "ds"), "--vocab-size", "300", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "val split has" in err and "--val-fraction" in err
    meta = json.load(open(tmp_path / "ds" / "meta.json"))
    assert meta["tokens"]["val"] >= 33  # at least one sequence of the tiny preset
    assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "ds"), "--out-dir", str(tmp_path / "r"),
                 "--max-steps", "3", "--no-progress"]) == 0
    recs = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert any("val_loss" in r for r in recs)


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for c in COMMANDS:
        assert c in out


def test_bad_arguments_are_one_line(capsys, tmp_path):
    _one_line_error(capsys, ["train", "--lr", "fast"], 2, "--lr", "expected a number > 0")
    _one_line_error(capsys, ["train", "--preset", "huge"], 2, "--preset", "invalid choice")
    _one_line_error(capsys, ["nosuchcommand"], 2, "invalid choice")
    _one_line_error(capsys, ["generate", "x", "--max-new-tokens", "0"], 2, "positive integer")
    _one_line_error(capsys, ["train", "--data", str(tmp_path / "missing")], 1, "no such dataset folder")
    _one_line_error(capsys, ["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")], 1,
                    "no such file or folder")
    _one_line_error(capsys, ["prepare", "x", "--out", "o", "--tokenizer", "t.json", "--vocab-size", "300"], 2,
                    "exclude each other")
    _one_line_error(capsys, ["generate", str(tmp_path / "nope.pt")], 1, "no such checkpoint")
    _one_line_error(capsys, ["train", "--batch-size", "0"], 2, "--batch-size", "expected a positive integer")
    _one_line_error(capsys, ["train", "--data", str(tmp_path)], 1, "not a prepared dataset")
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    _one_line_error(capsys, ["generate", str(bad)], 1, "not a readable checkpoint")
    _one_line_error(capsys, ["finetune", "--data", str(tmp_path / "none.jsonl")], 1, "no such file")


def test_corrupt_shard_via_cli(tiny_data, tmp_path, capsys):
    import shutil
    d = str(tmp_path / "ds")
    shutil.copytree(tiny_data, d)
    meta = json.load(open(os.path.join(d, "meta.json")))
    shard = os.path.join(d, meta["splits"]["train"][0]["file"])
    with open(shard, "r+b") as f:
        f.seek(200)
        f.write(b"\x13\x37")
    _one_line_error(capsys, ["train", "--preset", "tiny", "--data", d, "--out-dir", str(tmp_path / "r")], 1,
                    shard, "CRC")


def test_real_entry_point_one_line():
    """Through `python -m gptkernels` (what a user runs): exit status and a single stderr line."""
    p = subprocess.run([sys.executable, "-m", "gptkernels", "train", "--max-steps", "many"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--max-steps" in p.stderr, p.stderr


def test_prepare_train_generate(tiny_data, tiny_run, tmp_path, capsys):
    # prepare through the CLI
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("hello world\n" * 50)
    (src / "b.jsonl").write_text(json.dumps({"text": "some json text " * 20}) + "\n")
    assert main(["prepare", str(src), "--out", str(tmp_path / "p"), "--vocab-size", "300", "--no-progress",
                 "--val-fraction", "0.5"]) == 0
    meta = json.load(open(tmp_path / "p" / "meta.json"))
    assert meta["documents"] == 2 and meta["tokens"]["val"] > 0
    # generate from the trained checkpoint: deterministic for a seed
    capsys.readouterr()
    assert main(["generate", tiny_run, "--prompt", "def ", "--max-new-tokens", "12", "--seed", "3"]) == 0
    a = capsys.readouterr().out
    assert main(["generate", os.path.join(tiny_run, "ckpt.pt"), "--prompt", "def ", "--max-new-tokens", "12",
                 "--seed", "3"]) == 0
    b = capsys.readouterr().out
    assert a == b and a.startswith("def ")
    assert main(["generate", tiny_run, "--num-samples", "2", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2


def test_generate_from_hugging_face_gpt2_folder(tiny_data, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from gptkernels.gpt.tokenizer import Tokenizer
    tok = Tokenizer.load(tiny_data)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=tok.eos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    d = tmp_path / "hf"
    hf.save_pretrained(str(d))
    tok._tok.model.save(str(d))  # vocab.json + merges.txt, the GPT-2 format
    prompt = "import os\n"
    assert main(["generate", str(d), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0",
                 "--no-stop-at-eos"]) == 0
    out = capsys.readouterr().out
    # Greedy continuation equals transformers' own greedy decoding.
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_id)
    assert out.rstrip("\n") == tok.decode(ref[0].tolist())


def test_finetune_on_jsonl_and_csv(tiny_run, tmp_path, capsys):
    rows = []
    for i in range(60):
        rows.append({"text": f"def function_{i}(x):\n    return x + {i}\n", "label": "code"})
        rows.append({"text": f"The weather on day {i} was mild and pleasant.", "label": "prose"})
    j = tmp_path / "d.jsonl"
    j.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_ckpt = str(tmp_path / "clf.pt")
    assert main(["finetune", "--data", str(j), "--init", tiny_run, "--epochs", "3", "--lr", "3e-3",
                 "--max-len", "24", "--out", out_ckpt]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    acc = float(line.split("accuracy: ")[1].split("%")[0])
    assert acc >= 90.0, line  # an easy two-class task
    ck = torch.load(out_ckpt, weights_only=True)
    assert ck["labels"] == ["code", "prose"]
    c = tmp_path / "d.csv"
    import csv
    with open(c, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    assert main(["finetune", "--data", str(c), "--epochs", "1", "--max-len", "24", "--freeze-body"]) == 0
    assert "accuracy:" in capsys.readouterr().out


def test_finetune_bundled_set_is_real_local_text():
    from gptkernels.gpt.finetune import DEFAULT_PACKAGES, bundled_labelled_set
    train, evals = bundled_labelled_set()
    assert {lab for _, lab in train} == set(DEFAULT_PACKAGES) == {lab for _, lab in evals}
    assert len(train) > 1000 and len(evals) > 200
    assert not {t for t, _ in train} & {t for t, _ in evals}
    assert any("async def" in t for t, lab in train if lab == "asyncio")


def test_bench_passes_arguments(capsys, tmp_path):
    assert main(["bench", "--out", str(tmp_path), "--", "--help"]) == 0  # the script's own --help, after `--`
    assert "--quick" in capsys.readouterr().out

"""Bad input, broken files and faults, command by command: each ends with a non-zero exit status
(2 for a bad argument, 1 otherwise), no traceback, and one line `gptkernels <cmd>: error: ...`
that names the argument or the path.

Classes covered (see CASES and the tests below them):
  arguments  every numeric option of every command just outside its range (read from the parsers),
             non-finite numbers, bad choices, options that exclude or need each other
  files read missing, empty, truncated, corrupted (bit flips, bad JSON, bad UTF-8, wrong format,
             missing fields, ids >= vocabulary, a tokenizer that does not match), a folder for a file
  files written  a file where a folder goes, a path through a file, a read-only folder, a full disk
             (up front and in the middle of a checkpoint: no temporary file left behind)
  environment  GPTKERNELS_BACKEND, GPTKERNELS_CE_TARGET_CHECK, GPTKERNELS_DEBUG, GPTKERNELS_CACHE,
             torchrun's WORLD_SIZE / RANK
  text       prompts that are not UTF-8, too long for the context, too many new tokens
  memory     a CPU run larger than the memory available (refused; --force goes on with a warning)
"""
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from gptkernels.gpt.cli import build_parser, main

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import make_tiny_dataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT_V1 = os.path.join(ROOT, "tests", "data", "ckpt_v1")
TINY = ["--preset", "tiny", "--no-progress", "--max-steps", "2", "--eval-interval", "2", "--ckpt-interval", "2"]


# ---- fixtures and helpers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_dataset(str(tmp_path_factory.mktemp("bad") / "ds"))


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bad") / "run")
    assert main(["train", "--data", tiny_data, "--out-dir", out] + TINY) == 0
    return out


class Ctx:
    """What a case builds its arguments from: a fresh folder, the tiny dataset and run."""

    def __init__(self, tmp, data, run):
        self.tmp, self.data, self.run = tmp, data, run

    def path(self, name):
        return str(self.tmp / name)

    def file(self, name, content=b""):
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(p)

    def dataset(self, name="ds"):
        d = self.path(name)
        shutil.copytree(self.data, d)
        return d

    def shard(self, d, split="train"):
        meta = json.load(open(os.path.join(d, "meta.json")))
        return os.path.join(d, meta["splits"][split][0]["file"])

    def ckpt(self, name="ck.pt"):
        p = self.path(name)
        shutil.copy(os.path.join(self.run, "ckpt.pt"), p)
        return p

    def run_copy(self, name="run"):
        d = self.path(name)
        shutil.copytree(self.run, d)
        return d


def one_line_error(capsys, argv, code):
    """Run the command; assert its exit status and a single error line; return that line."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("gptkernels")]
    assert rc == code, (rc, err[-2000:])
    assert lines and lines[-1].startswith(f"gptkernels {argv[0]}: error: "), err[-2000:]
    assert len([ln for ln in lines if ": error: " in ln]) == 1, err
    return lines[-1]


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x55]))


def tensor_offset(path, name_part="transformer.h.0"):
    """Offset of a byte inside a stored tensor of a torch.save zip (the largest data record)."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if "/data/" in i.filename]
        big = max(infos, key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(big.header_offset + 26)
        n, m = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return big.header_offset + 30 + n + m + big.file_size // 2


@contextlib.contextmanager
def unwritable(path):
    """A folder nobody may write into: chmod for a user, `chattr +i` for root (skip if neither works)."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield path
        finally:
            os.chmod(path, 0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", path], capture_output=True).returncode:
        pytest.skip("running as root without chattr +i: cannot make a read-only folder")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", path], capture_output=True)


# ---- every numeric option just outside its range, read from the parsers --------------------------

_BAD = {"int": "1.5", "int>=0": "-1", "int>=1": "0", "float": "nan", "float>=0": "-1", "float>0": "0",
        "[0,1)": "1", "[0,1]": "1.5", "(0,1]": "0"}


def _numeric_options():
    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    out = []
    for cmd, p in sub.choices.items():
        for a in p._actions:
            kind = getattr(a.type, "kind", None)
            if kind and a.option_strings:
                out.append((cmd, a.option_strings[0], kind))
    return out


NUMERIC = _numeric_options()


def test_every_command_has_range_checked_options():
    assert {c for c, _, _ in NUMERIC} >= {"prepare", "train", "generate", "finetune"}
    assert len(NUMERIC) >= 40


@pytest.mark.parametrize("cmd,flag,kind", NUMERIC, ids=[f"{c}{f}" for c, f, _ in NUMERIC])
def test_numeric_option_out_of_range(cmd, flag, kind, capsys):
    pos = {"prepare": ["x.txt", "--out", "o"], "generate": ["run"]}.get(cmd, [])
    line = one_line_error(capsys, [cmd] + pos + [flag, _BAD[kind]], 2)
    assert flag in line and "expected" in line


@pytest.mark.parametrize("argv,needle", [
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--dropout", "nan"], "--dropout"),
    (["train", "--preset", "huge"], "--preset"),
    (["train", "--dtype", "float16"], "--dtype"),
    (["train", "--activation", "swish"], "--activation"),
    (["train", "--compile-mode", "fastest"], "--compile-mode"),
    (["generate", "run", "--max-new-tokens", "many"], "--max-new-tokens"),
    (["generate", "run", "--device", "gpu"], "--device"),
    (["train", "--device", "cuda:x"], "--device"),
    (["finetune", "--device", "tpu"], "--device"),
    (["bench", "--ops", "nosuch"], "--ops"),
    (["bench", "--e2e", "--ops", "mlp"], "--ops"),
    (["bench", "--", "--out", "x"], "--out"),
    (["prepare", "x.txt", "--out", "o", "--tokenizer", "t.json", "--vocab-size", "300"], "--vocab-size"),
    (["finetune", "--eval-data", "e.jsonl"], "--eval-data"),
])
def test_bad_argument_values_and_combinations(argv, needle, capsys):
    assert needle in one_line_error(capsys, argv, 2)


def test_train_argument_combinations(tiny_data, tmp_path, capsys):
    base = ["train", "--data", tiny_data, "--out-dir", str(tmp_path / "r")] + TINY
    assert "tokens_per_step" in one_line_error(capsys, base + ["--tokens-per-step", "100"], 2)
    assert "n_embd" in one_line_error(capsys, base + ["--n-embd", "30", "--n-head", "4"], 2)
    assert "--fsdp" in one_line_error(capsys, base + ["--fsdp"], 2)


# ---- files read and written, per command ---------------------------------------------------------

def _ids_over_vocab(c):
    """A shard whose ids exceed the vocabulary, with a valid CRC (what --no-verify-data used to crash on)."""
    import zlib

    import numpy as np

    from gptkernels.gpt.data import shards
    d = c.dataset()
    path = c.shard(d)
    h = shards.read_header(path)
    raw = bytearray(open(path, "rb").read())
    toks = np.frombuffer(bytes(raw[shards.HEADER_BYTES:]), dtype=h["dtype"]).copy()
    toks[len(toks) // 2] = h["vocab_size"] + 3
    data = toks.tobytes()
    head = shards._HEADER.pack(shards.MAGIC, shards.VERSION, h["itemsize"], h["count"], h["vocab_size"],
                               zlib.crc32(data))
    with open(path, "wb") as f:
        f.write(head.ljust(shards.HEADER_BYTES, b"\0") + data)
    return d


def _corrupt_ds(c, what):
    d = c.dataset()
    if what == "meta_empty":
        c.file("ds/meta.json", "")
    elif what == "meta_garbage":
        c.file("ds/meta.json", "{not json")
    elif what == "meta_utf8":
        c.file("ds/meta.json", b"\xff\xfe{}")
    elif what == "meta_format":
        c.file("ds/meta.json", json.dumps({"format": "something-else"}))
    elif what == "meta_fields":
        meta = json.load(open(os.path.join(d, "meta.json")))
        del meta["splits"]
        c.file("ds/meta.json", json.dumps(meta))
    elif what == "shard_missing":
        os.remove(c.shard(d))
    elif what == "shard_empty":
        open(c.shard(d), "wb").close()
    elif what == "shard_truncated":
        with open(c.shard(d), "r+b") as f:
            f.truncate(os.path.getsize(c.shard(d)) - 7)
    elif what == "shard_flipped":
        flip_byte(c.shard(d), 200)
    elif what == "tokenizer_missing":
        os.remove(os.path.join(d, "tokenizer.json"))
    elif what == "tokenizer_garbage":
        c.file("ds/tokenizer.json", "{}")
    elif what == "tokenizer_other":
        from gptkernels.gpt.tokenizer import Tokenizer
        Tokenizer.train(iter(["some other text " * 50]), vocab_size=300).save(os.path.join(d, "tokenizer.json"))
    return d


def _broken_ckpt(c, what):
    p = c.ckpt()
    if what == "empty":
        open(p, "wb").close()
    elif what == "truncated":
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) // 2)
    elif what == "garbage":
        c.file("ck.pt", b"PK\x03\x04" + b"\x00" * 300)
    elif what == "flipped":
        flip_byte(p, tensor_offset(p))
    elif what == "not_ours":
        torch.save({"format": "something"}, p)
    elif what == "no_model":
        ck = torch.load(p, weights_only=True)
        del ck["model"]
        torch.save(ck, p)
    elif what == "edited":  # a setting changed without the checksum: caught by the checksum of the rest
        ck = torch.load(p, weights_only=True)
        ck["step"] = 999
        torch.save(ck, p)
    elif what == "bad_config":
        ck = torch.load(p, weights_only=True)
        ck["model_config"]["n_embd"] = 33
        ck.pop("checksums")
        torch.save(ck, p)
    return p


CORRUPT_DS = ["meta_empty", "meta_garbage", "meta_utf8", "meta_format", "meta_fields", "shard_missing", "shard_empty",
              "shard_truncated", "shard_flipped", "tokenizer_missing", "tokenizer_garbage", "tokenizer_other"]
BROKEN_CKPT = ["empty", "truncated", "garbage", "flipped", "not_ours", "no_model", "edited", "bad_config"]


@pytest.mark.parametrize("what", CORRUPT_DS)
def test_train_broken_dataset(what, tiny_data, tiny_run, tmp_path, capsys):
    c = Ctx(tmp_path, tiny_data, tiny_run)
    d = _corrupt_ds(c, what)
    line = one_line_error(capsys, ["train", "--data", d, "--out-dir", c.path("r")] + TINY, 1)
    assert d in line


@pytest.mark.parametrize("verify", ["--verify-data", "--no-verify-data"])
def test_train_shard_ids_beyond_vocabulary(verify, tiny_data, tiny_run, tmp_path, capsys):
    c = Ctx(tmp_path, tiny_data, tiny_run)
    d = _ids_over_vocab(c)
    line = one_line_error(capsys, ["train", "--data", d, "--out-dir", c.path("r"), verify] + TINY, 1)
    assert c.shard(d) in line and "token id" in line


@pytest.mark.parametrize("what", BROKEN_CKPT)
def test_generate_broken_checkpoint(what, tiny_data, tiny_run, tmp_path, capsys):
    p = _broken_ckpt(Ctx(tmp_path, tiny_data, tiny_run), what)
    line = one_line_error(capsys, ["generate", p, "--max-new-tokens", "2"], 1)
    assert p in line


@pytest.mark.parametrize("what", ["truncated", "flipped", "edited"])
def test_resume_and_finetune_init_broken_checkpoint(what, tiny_data, tiny_run, tmp_path, capsys):
    c = Ctx(tmp_path, tiny_data, tiny_run)
    run = c.run_copy()
    os.replace(_broken_ckpt(c, what), os.path.join(run, "ckpt.pt"))
    line = one_line_error(capsys, ["train", "--data", tiny_data, "--out-dir", run, "--resume"] + TINY, 1)
    assert os.path.join(run, "ckpt.pt") in line
    data = c.file("d.jsonl", "".join(json.dumps({"text": f"t {i}", "label": str(i % 2)}) + "\n" for i in range(20)))
    assert run in one_line_error(capsys, ["finetune", "--data", data, "--init", run, "--epochs", "1"], 1)


def test_flipped_tensor_names_the_tensor_and_no_verify_loads_it(tiny_data, tiny_run, tmp_path, capsys):
    p = _broken_ckpt(Ctx(tmp_path, tiny_data, tiny_run), "flipped")
    line = one_line_error(capsys, ["generate", p, "--max-new-tokens", "2"], 1)
    assert "CRC-32" in line and "--no-verify" in line and ("model/" in line or "optimizer/" in line)
    assert main(["generate", p, "--max-new-tokens", "2", "--no-verify"]) == 0


def test_checkpoint_without_checksums_loads_with_a_note(capsys):
    assert main(["generate", CKPT_V1, "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert "no checksums" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["missing", "no_config_weights", "bad_config"])
def test_generate_broken_hugging_face_folder(what, tmp_path, capsys):
    d = tmp_path / "hf"
    d.mkdir()
    if what == "no_config_weights":
        (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 300, "n_positions": 32,
                                                   "n_embd": 32, "n_layer": 1, "n_head": 2}))
    elif what == "bad_config":
        (d / "config.json").write_text("{broken")
    src = str(d / "nothing") if what == "missing" else str(d)
    assert src in one_line_error(capsys, ["generate", src], 1)


def _prepare_inputs(c, what):
    if what == "missing":
        return [c.path("nope.txt")]
    if what == "empty_folder":
        os.makedirs(c.path("empty"))
        return [c.path("empty")]
    if what == "empty_file":
        return [c.file("e.txt", "")]
    if what == "bad_json":
        return [c.file("b.jsonl", '{"text": "ok"}\n{oops\n')]
    if what == "no_field":
        return [c.file("n.jsonl", json.dumps({"body": "x"}) + "\n")]
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["missing", "empty_folder", "empty_file", "bad_json", "no_field"])
def test_prepare_bad_inputs(what, tmp_path, capsys):
    c = Ctx(tmp_path, None, None)
    inputs = _prepare_inputs(c, what)
    line = one_line_error(capsys, ["prepare"] + inputs + ["--out", c.path("o"), "--vocab-size", "300",
                                                          "--no-progress"], 1)
    assert inputs[0] in line
    assert not os.path.exists(c.path("o"))


@pytest.mark.parametrize("what", ["missing", "garbage", "not_utf8"])
def test_prepare_bad_tokenizer(what, tmp_path, capsys):
    c = Ctx(tmp_path, None, None)
    src = c.file("a.txt", "hello world\n" * 20)
    tok = {"missing": lambda: c.path("t.json"), "garbage": lambda: c.file("t.json", "{nope"),
           "not_utf8": lambda: c.file("t.json", b"\xff")}[what]()
    assert tok in one_line_error(capsys, ["prepare", src, "--out", c.path("o"), "--tokenizer", tok,
                                          "--no-progress"], 1)


def _finetune_data(c, what):
    rows = "".join(json.dumps({"text": f"text {i}", "label": str(i % 2)}) + "\n" for i in range(20))
    return {
        "missing": lambda: c.path("none.jsonl"),
        "empty": lambda: c.file("e.jsonl", ""),
        "folder": lambda: os.path.dirname(c.file("f.jsonl/x", "")),
        "bad_json": lambda: c.file("b.jsonl", rows + "{oops\n"),
        "csv_header": lambda: c.file("c.csv", "words,class\nhello,a\n"),
        "not_utf8": lambda: c.file("u.jsonl", rows.encode() + b'{"text": "\xff\xfe", "label": "1"}\n'),
        "one_class": lambda: c.file("o.jsonl", "".join(json.dumps({"text": f"t{i}", "label": "a"}) + "\n"
                                                       for i in range(9))),
        "extension": lambda: c.file("d.parquet", "x"),
    }[what]()


@pytest.mark.parametrize("what", ["missing", "empty", "folder", "bad_json", "csv_header", "not_utf8", "one_class",
                                  "extension"])
def test_finetune_bad_data(what, tmp_path, capsys):
    c = Ctx(tmp_path, None, None)
    path = _finetune_data(c, what)
    line = one_line_error(capsys, ["finetune", "--data", path, "--epochs", "1"], 1)
    assert path in line or what == "one_class"


@pytest.mark.parametrize("cmd", ["prepare", "finetune", "generate"])
def test_unreadable_input(cmd, tiny_data, tiny_run, tmp_path, capsys, monkeypatch):
    """A file the user may not read (simulated: root reads everything): "cannot read ...: permission denied"."""
    import builtins

    from gptkernels.gpt import checkpoint, finetune
    from gptkernels.gpt.data import corpus
    c = Ctx(tmp_path, tiny_data, tiny_run)
    target = {"prepare": lambda: c.file("a.txt", "hello\n" * 50),
              "finetune": lambda: c.file("d.jsonl", json.dumps({"text": "a", "label": "x"}) + "\n"),
              "generate": c.ckpt}[cmd]()
    real = builtins.open

    def guarded(path, *a, **k):
        if os.fspath(path) == target:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(path, *a, **k)

    for mod in (corpus, finetune, checkpoint):
        monkeypatch.setattr(mod, "open", guarded, raising=False)
    argv = {"prepare": ["prepare", target, "--out", c.path("o"), "--vocab-size", "300", "--no-progress"],
            "finetune": ["finetune", "--data", target], "generate": ["generate", target]}[cmd]
    line = one_line_error(capsys, argv, 1)
    assert "permission denied" in line and target in line


# ---- files written -------------------------------------------------------------------------------

def _out_args(c, cmd, out):
    src = c.file("corpus/a.txt", "hello world, some text\n" * 30)
    return {
        "prepare": ["prepare", src, "--out", out, "--vocab-size", "300", "--no-progress"],
        "train": ["train", "--data", c.data or "", "--out-dir", out] + TINY,
        "finetune": ["finetune", "--data", c.file("d.jsonl", "".join(
            json.dumps({"text": f"t {i}", "label": str(i % 2)}) + "\n" for i in range(20))), "--epochs", "1",
            "--out", out],
        "bench": ["bench", "--quick", "--out", out, "--ops", "activation"],
    }[cmd]


@pytest.mark.parametrize("cmd", ["prepare", "train", "finetune", "bench"])
@pytest.mark.parametrize("where", ["a_file", "under_a_file", "read_only"])
def test_unusable_output_place(cmd, where, tiny_data, tmp_path, capsys):
    c = Ctx(tmp_path, tiny_data, None)
    blocker = c.file("blocker", "x")
    if where == "a_file":
        out = blocker if cmd != "finetune" else os.path.dirname(blocker)  # finetune --out is a file: give a folder
    elif where == "under_a_file":
        out = os.path.join(blocker, "sub", "out.pt" if cmd == "finetune" else "out")
    else:
        ro = c.path("ro")
        with unwritable(ro):
            out = os.path.join(ro, "out.pt" if cmd == "finetune" else "out")
            line = one_line_error(capsys, _out_args(c, cmd, out), 1)
        assert ro in line
        return
    line = one_line_error(capsys, _out_args(c, cmd, out), 1)
    assert blocker in line or out in line


def test_finetune_checks_out_before_training(tmp_path, capsys, monkeypatch):
    """A read-only --out used to fail only after the training."""
    import gptkernels.gpt.finetune as ft
    monkeypatch.setattr(ft, "bundled_labelled_set", lambda seed=0: pytest.fail("loaded data before checking --out"))
    with unwritable(str(tmp_path / "ro")):
        one_line_error(capsys, ["finetune", "--out", str(tmp_path / "ro" / "c.pt")], 1)


def test_full_disk_up_front(tiny_data, tmp_path, capsys, monkeypatch):
    import shutil as sh
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    line = one_line_error(capsys, ["train", "--data", tiny_data, "--out-dir", str(tmp_path / "r")] + TINY, 1)
    assert "free disk space" in line and str(tmp_path / "r") in line


def test_full_disk_while_writing_a_checkpoint_leaves_nothing_behind(tiny_data, tmp_path, capsys, monkeypatch):
    from gptkernels.gpt import atomic
    real_write = atomic._Recording.write

    def write(self, b):
        if self._f.name.endswith(".tmp" + str(os.getpid())) and "ckpt.pt" in self._f.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, b)

    monkeypatch.setattr(atomic._Recording, "write", write)
    out = tmp_path / "r"
    line = one_line_error(capsys, ["train", "--data", tiny_data, "--out-dir", str(out)] + TINY, 1)
    assert "no space left" in line and str(out / "ckpt.pt") in line
    assert [f for f in os.listdir(out) if ".tmp" in f] == []


def test_full_disk_while_preparing_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    from gptkernels.gpt import atomic
    real_write = atomic._Recording.write

    def write(self, b):
        if len(b) > 64:  # the tokens of a shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, b)

    monkeypatch.setattr(atomic._Recording, "write", write)
    src = tmp_path / "a.txt"
    src.write_text("hello world, some text\n" * 300)
    line = one_line_error(capsys, ["prepare", str(src), "--out", str(tmp_path / "o"), "--vocab-size", "300",
                                   "--no-progress"], 1)
    assert "no space left" in line and str(tmp_path / "o") in line
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


# ---- environment variables -----------------------------------------------------------------------

def _cli(args, env, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    return subprocess.run([sys.executable, "-m", "gptkernels"] + args, capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_info_runs_and_reports_every_bad_setting(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    p = _cli(["info"], {"GPTKERNELS_BACKEND": "bogus", "GPTKERNELS_CE_TARGET_CHECK": "never",
                        "GPTKERNELS_DEBUG": "yes", "GPTKERNELS_CACHE": str(blocker)})
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "extension gptkernels._C" in p.stdout and "INVALID" in p.stdout  # the report itself ran
    last = p.stderr.strip().splitlines()[-1]
    for name in ("GPTKERNELS_BACKEND", "GPTKERNELS_CE_TARGET_CHECK", "GPTKERNELS_DEBUG", "GPTKERNELS_CACHE"):
        assert name in last, last


@pytest.mark.parametrize("name,value", [("GPTKERNELS_BACKEND", "bogus"), ("GPTKERNELS_CE_TARGET_CHECK", "never"),
                                        ("GPTKERNELS_DEBUG", "yes"), ("GPTKERNELS_CACHE", "<file>"),
                                        ("WORLD_SIZE", "two"), ("RANK", "-1")])
def test_bad_environment_variable_is_one_line(name, value, tmp_path, capsys, monkeypatch):
    from gptkernels import _backend
    from gptkernels.ops import loss as ops_loss
    monkeypatch.setattr(_backend, "_mode", None)  # read the variable again, as a fresh process would
    monkeypatch.setattr(ops_loss, "_target_check", None)
    if value == "<file>":
        value = str(tmp_path / "f")
        (tmp_path / "f").write_text("x")
    monkeypatch.setenv(name, value)
    line = one_line_error(capsys, ["train", "--preset", "tiny", "--out-dir", str(tmp_path / "r"), "--no-progress"], 1)
    assert name in line


def test_bad_backend_variable_fails_at_first_use_not_import(tmp_path):
    p = _cli(["train", "--preset", "tiny", "--out-dir", str(tmp_path / "r")], {"GPTKERNELS_BACKEND": "bogus"})
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("gptkernels train: error: GPTKERNELS_BACKEND")


# ---- text and context ----------------------------------------------------------------------------

def test_prompts(tiny_run, capsys):
    line = one_line_error(capsys, ["generate", tiny_run, "--prompt", "abc\udcff"], 2)
    assert "--prompt" in line and "UTF-8" in line and "0xff" in line
    line = one_line_error(capsys, ["generate", tiny_run, "--prompt", "word " * 200], 2)
    assert "--prompt" in line and "plus the end-of-text token" in line
    from gptkernels.gpt.checkpoint import load_model
    _, tok, _ = load_model(tiny_run)
    assert int(line.split("--prompt: ")[1].split(" tokens")[0]) == len(tok.encode("word " * 200))  # the user's tokens
    line = one_line_error(capsys, ["generate", tiny_run, "--prompt", "def", "--max-new-tokens", "500"], 2)
    assert "--max-new-tokens" in line and "at most" in line
    assert main(["generate", tiny_run, "--prompt", "def", "--max-new-tokens", line.split("at most ")[1]]) == 0
    assert main(["generate", tiny_run, "--prompt", "def"]) == 0  # the default: 200, or as many as fit


def test_sample_prompt_too_long_or_not_text(tiny_data, tmp_path, capsys):
    base = ["train", "--data", tiny_data, "--out-dir", str(tmp_path / "r")] + TINY
    assert "--sample-prompt" in one_line_error(capsys, base + ["--sample-prompt", "word " * 100], 2)
    assert "--sample-prompt" in one_line_error(capsys, base + ["--sample-prompt", "\udc80"], 2)


# ---- memory ----------------------------------------------------------------------------------------

def test_cpu_run_larger_than_memory_is_refused_or_forced(tiny_data, tmp_path, capsys, monkeypatch):
    from gptkernels.gpt.train import budget
    monkeypatch.setattr(budget, "available_ram", lambda: 10**6)
    base = ["train", "--data", tiny_data, "--out-dir", str(tmp_path / "r"), "--device", "cpu"] + TINY
    line = one_line_error(capsys, base, 1)
    assert "memory" in line and "--batch-size" in line and "--force" in line
    assert not os.path.exists(tmp_path / "r" / "ckpt.pt")
    assert main(base + ["--force"]) == 0
    assert "warning: this run needs about" in capsys.readouterr().err


def test_memory_estimate_is_above_a_measured_step():
    """The estimate of budget.py against a measurement in the same units (run in a fresh process)."""
    from gptkernels.gpt.config import GPTConfig
    from gptkernels.gpt.train import budget
    cfg = GPTConfig(vocab_size=512, block_size=256, n_layer=2, n_head=4, n_embd=128)
    est = budget.cpu_step_bytes(cfg, budget.count_params(cfg), 8, 256)
    code = ("import resource, torch\nfrom gptkernels.gpt import GPT, GPTConfig\nfrom gptkernels.gpt.optim import adamw\n"
            "def rss():\n    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()\n"
            "r0 = rss()\nm = GPT(GPTConfig(vocab_size=512, block_size=256, n_layer=2, n_head=4, n_embd=128))\n"
            "opt = adamw(m.parameters(), 1e-3, 0.1, torch.device('cpu'))\nx = torch.randint(0, 512, (8, 256))\n"
            "for _ in range(2):\n    _, loss = m(x, x); loss.backward(); opt.step(); opt.zero_grad()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - r0)\n")
    env = {**os.environ, "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    measured = int(p.stdout.strip().splitlines()[-1])
    assert measured < est < 4 * measured + 10**9, (measured, est)

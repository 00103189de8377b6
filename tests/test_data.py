"""Data pipeline: prepare round-trips text, shard integrity checks, the batch loader's order."""
import json
import os

import numpy as np
import pytest
import torch

from gptkernels.gpt import data
from gptkernels.gpt.data import DataError
from gptkernels.gpt.tokenizer import Tokenizer

DOCS = [
    "def f(x):\n    return x * 2  # doubles\n",
    "Émile a mangé 3 crêpes 🥞 à Zürich.\n",
    "日本語の文章です。\n中文句子。\n",
    "tabs\tand\x00nulls\x1b[0m and <|endoftext|> inside\n",
    "plain text, many words, repeated. " * 40,
]


def _write_corpus(root):
    os.makedirs(root / "sub" / "deeper", exist_ok=True)
    (root / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (root / "b.md").write_text(DOCS[1], encoding="utf-8")
    (root / "sub" / "c.py").write_text(DOCS[2], encoding="utf-8")
    (root / "sub" / "deeper" / "d.txt").write_text(DOCS[3], encoding="utf-8")
    with open(root / "sub" / "e.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": DOCS[4], "id": 1}) + "\n\n")
    (root / "ignored.bin").write_bytes(b"\xff\xfe\x00binary")
    (root / ".hidden.txt").write_text("hidden")
    return DOCS


def _decode_split(d, split, tok):
    toks = np.concatenate([data.open_shard(os.path.join(d, s["file"])) for s in data.load_meta(d)["splits"][split]]) \
        if data.load_meta(d)["splits"][split] else np.zeros(0, np.uint16)
    return toks, tok.decode(toks.tolist())


def test_prepare_round_trips_text(tmp_path):
    docs = _write_corpus(tmp_path / "corpus")
    out = tmp_path / "ds"
    meta = data.prepare([str(tmp_path / "corpus")], str(out), vocab_size=300, val_fraction=0.0, progress=False,
                        log=lambda s: None)
    assert meta["documents"] == 5 and meta["files"] == 5 and meta["dtype"] == "uint16"
    tok = Tokenizer.load(str(out / "tokenizer.json"))
    toks, text = _decode_split(str(out), "train", tok)
    # Every document starts with end-of-text, in walk order: a.txt b.md sub/c.py sub/e.jsonl sub/deeper/d.txt
    expected_order = [docs[0], docs[1], docs[2], docs[4], docs[3]]
    assert text == "".join(tok.eos_token + d for d in expected_order)
    assert int((toks == tok.eos_id).sum()) == 5 + 1  # one literal <|endoftext|> inside DOCS[3]
    assert meta["tokens"]["train"] == len(toks) and meta["tokens"]["val"] == 0


def test_prepare_split_keeps_documents_whole(tmp_path):
    corpus = tmp_path / "c.jsonl"
    docs = [f"document number {i}: " + "word " * (i % 7 + 1) + "\n" for i in range(40)]
    corpus.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    out = tmp_path / "ds"
    meta = data.prepare([str(corpus)], str(out), vocab_size=300, val_fraction=0.1, progress=False,
                        text_field="body", log=lambda s: None, min_val_tokens=0)  # (the rule alone, no floor)
    tok = Tokenizer.load(str(out))
    _, tr = _decode_split(str(out), "train", tok)
    _, va = _decode_split(str(out), "val", tok)
    tr_docs = tr.split(tok.eos_token)[1:]
    va_docs = va.split(tok.eos_token)[1:]
    assert sorted(tr_docs + va_docs) == sorted(docs)
    assert len(va_docs) == 4  # every 10th document
    assert meta["tokens"]["val"] > 0


def test_single_document_still_gets_a_val_split(tmp_path):
    f = tmp_path / "book.txt"
    text = "".join(f"line {i} of a single long document.\n" for i in range(300))
    f.write_text(text)
    out = tmp_path / "ds"
    data.prepare([str(f)], str(out), vocab_size=300, val_fraction=0.1, piece_tokens=256, progress=False,
                 log=lambda s: None)
    tok = Tokenizer.load(str(out))
    tr_toks, _ = _decode_split(str(out), "train", tok)
    va_toks, _ = _decode_split(str(out), "val", tok)
    assert len(va_toks) > 0 and len(tr_toks) > 5 * len(va_toks)
    # One piece only: cut in two, still nothing lost.
    out2 = tmp_path / "ds2"
    data.prepare([str(f)], str(out2), vocab_size=300, val_fraction=0.1, progress=False, log=lambda s: None)
    tr2, _ = _decode_split(str(out2), "train", tok)
    va2, _ = _decode_split(str(out2), "val", tok)
    assert len(va2) > 0 and tok.decode(np.concatenate([tr2, va2]).tolist()) == tok.eos_token + text


def test_small_corpus_val_split_is_a_fraction_of_tokens_with_a_floor(tmp_path):
    """A few files: whole pieces cannot make a val split, so it is the last tokens of the stream:
    max(val_fraction, min(1024 tokens, 10%)) of them, cut inside the last document."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"f{i}.txt").write_text("".join(f"line {j} of file {i}: some words\n" for j in range(150)))
    notes = []
    for frac, name in ((0.01, "a"), (0.2, "b")):
        meta = data.prepare([str(corpus)], str(tmp_path / name), vocab_size=300, val_fraction=frac, progress=False,
                            log=notes.append)
        total = meta["tokens"]["train"] + meta["tokens"]["val"]
        floor = min(1024, total // 10)
        assert meta["tokens"]["val"] == max(round(frac * total), floor), (frac, meta["tokens"])
    # Nothing lost or reordered: train + val is the whole stream.
    tok = Tokenizer.load(str(tmp_path / "a"))
    tr, _ = _decode_split(str(tmp_path / "a"), "train", tok)
    va, _ = _decode_split(str(tmp_path / "a"), "val", tok)
    text = tok.decode(np.concatenate([tr, va]).tolist())
    assert text.count(tok.eos_token) == 3 and text.endswith("line 149 of file 2: some words\n")
    # The log says how many val tokens there are and how to get more.
    assert any("val split has" in n and "--val-fraction" in n for n in notes), notes


def test_val_fraction_of_a_larger_corpus_follows_the_rule(tmp_path):
    docs = [f"document {i}: " + "some words here " * 20 + "\n" for i in range(400)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = data.prepare([str(corpus)], str(tmp_path / "ds"), vocab_size=300, val_fraction=0.05, progress=False,
                        log=lambda s: None, min_val_tokens=64)
    total = meta["tokens"]["train"] + meta["tokens"]["val"]
    assert 0.03 < meta["tokens"]["val"] / total < 0.07  # every 20th document, whole


def test_large_file_read_in_blocks(tmp_path, monkeypatch):
    """Files bigger than the read block stream in newline-cut pieces (and at UTF-8 character
    boundaries when a line is longer than the block); the text still comes back exactly."""
    from gptkernels.gpt.data import corpus
    monkeypatch.setattr(corpus, "_READ_BLOCK", 64)
    text = "".join(f"línea {i} — 日本 🎉\n" for i in range(50)) + "x€" * 200 + "\nend"
    f = tmp_path / "big.txt"
    f.write_text(text, encoding="utf-8")
    docs = list(data.iter_documents([str(f)]))
    assert len(docs) > 10 and "".join(docs) == text
    out = tmp_path / "ds"
    meta = data.prepare([str(f)], str(out), vocab_size=300, val_fraction=0.0, progress=False, log=lambda s: None)
    tok = Tokenizer.load(str(out))
    _, back = _decode_split(str(out), "train", tok)
    assert back == tok.eos_token + text and meta["documents"] == 1


def test_many_shards_and_existing_tokenizer(tmp_path):
    _write_corpus(tmp_path / "corpus")
    a = tmp_path / "a"
    data.prepare([str(tmp_path / "corpus")], str(a), vocab_size=300, val_fraction=0, progress=False, log=lambda s: None)
    b = tmp_path / "b"
    meta = data.prepare([str(tmp_path / "corpus")], str(b), tokenizer=str(a / "tokenizer.json"), val_fraction=0,
                        shard_tokens=50, progress=False, log=lambda s: None)
    assert len(meta["splits"]["train"]) > 3
    assert all(s["tokens"] <= 50 for s in meta["splits"]["train"])
    ta, _ = _decode_split(str(a), "train", Tokenizer.load(str(a)))
    tb, _ = _decode_split(str(b), "train", Tokenizer.load(str(b)))
    assert np.array_equal(ta, tb)
    with pytest.raises(DataError, match="already holds"):
        data.prepare([str(tmp_path / "corpus")], str(b), vocab_size=300, progress=False, log=lambda s: None)


def test_uint32_shards_for_large_vocabularies(tmp_path):
    p = str(tmp_path / "s.bin")
    toks = np.array([0, 65535, 65536, 69999, 7], dtype=np.int64)
    data.write_shard(p, toks, vocab_size=70000)
    h = data.read_header(p)
    assert h["itemsize"] == 4 and h["count"] == 5 and h["vocab_size"] == 70000
    assert np.array_equal(data.open_shard(p), toks)
    assert data.dtype_for_vocab(65536) == np.uint16 and data.dtype_for_vocab(65537) == np.uint32
    with pytest.raises(ValueError, match="token ids"):
        data.write_shard(str(tmp_path / "t.bin"), [70000], vocab_size=70000)


def test_truncated_and_corrupt_shards_are_reported_with_their_path(tmp_path):
    p = str(tmp_path / "train_000000.bin")
    data.write_shard(p, np.arange(1000) % 300, vocab_size=300)
    raw = open(p, "rb").read()

    def bad(content, match):
        with open(p, "wb") as f:
            f.write(content)
        with pytest.raises(DataError, match=match) as e:
            data.open_shard(p)
        assert p in str(e.value)

    bad(raw[:-3], "truncated")
    bad(raw[:20], "truncated")
    bad(raw + b"\0\0", "beyond")
    bad(b"XXXXXXXX" + raw[8:], "bad magic")
    flipped = bytearray(raw)
    flipped[500] ^= 0x40
    bad(bytes(flipped), "CRC")
    bumped = bytearray(raw)
    bumped[8] = 9
    bad(bytes(bumped), "version")
    with pytest.raises(DataError, match="not found"):
        data.open_shard(str(tmp_path / "nope.bin"))


def test_truncated_shard_detected_when_loading_a_dataset(tmp_path):
    _write_corpus(tmp_path / "corpus")
    out = tmp_path / "ds"
    meta = data.prepare([str(tmp_path / "corpus")], str(out), vocab_size=300, val_fraction=0, progress=False,
                        log=lambda s: None)
    shard = os.path.join(str(out), meta["splits"]["train"][0]["file"])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 10)
    with pytest.raises(DataError, match="truncated") as e:
        data.TokenSplit(str(out), "train", 8)
    assert shard in str(e.value)


def test_input_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.list_corpus_files([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no text files"):
        data.list_corpus_files([str(tmp_path / "empty")])
    j = tmp_path / "x.jsonl"
    j.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: not valid JSON"):
        list(data.iter_documents([str(j)]))
    j.write_text('{"txt": "ok"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:1: expected a JSON object with a string field 'text'"):
        list(data.iter_documents([str(j)]))
    with pytest.raises(DataError, match="not a prepared dataset"):
        data.load_meta(str(tmp_path / "empty"))


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("café\n".encode("latin-1"))
    st = data.CorpusStats()
    docs = list(data.iter_documents([str(f)], stats=st))
    assert docs == ["caf\ufffd\n"] and st.invalid_utf8_files == 1


def test_bundled_corpus_files_exist():
    top, full = data.stdlib_files("top"), data.stdlib_files("all")
    assert len(top) > 50 and len(full) > len(top)
    assert any(p.endswith(os.sep + "os.py") for p in top)
    assert sum(os.path.getsize(p) for p in full) > 5e6  # "a few tens of MB" on CPython


# ---- the loader ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 100, 1000, 4097])
def test_feistel_is_a_permutation(n):
    for seed, epoch in ((0, 0), (1, 0), (1, 5)):
        p = data.feistel_permute(np.arange(n), n, seed, epoch)
        assert sorted(p.tolist()) == list(range(n))
    if n >= 64:
        assert not np.array_equal(data.feistel_permute(np.arange(n), n, 0, 0), data.feistel_permute(np.arange(n), n, 0, 1))


@pytest.fixture
def split(tmp_path):
    """A 3-shard split of known tokens: shard i holds i*1000 + arange(len)."""
    d = tmp_path / "ds"
    d.mkdir()
    shards = []
    for i, n in enumerate([101, 57, 230]):
        shards.append(data.write_shard(str(d / f"train_{i:06d}.bin"), (i * 1000 + np.arange(n)) % 5000, vocab_size=5000))
    meta = {"format": data.META_FORMAT, "version": 1, "vocab_size": 5000, "eos_id": 0, "tokenizer": "tokenizer.json",
            "splits": {"train": shards, "val": []}, "tokens": {"train": 388, "val": 0}}
    (d / "meta.json").write_text(json.dumps(meta))
    return data.TokenSplit(str(d), "train", block_size=10)


def test_windows_and_targets(split):
    assert split.n_windows == 10 + 5 + 22
    w = split.window(10)  # first window of shard 1
    assert w.tolist() == list(range(1000, 1011))
    L = data.TokenBatches(split, batch_size=4, seed=0)
    x, y = L.next_batch()
    assert x.shape == y.shape == (4, 10) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert ((y - x) == 1).all()  # contiguous windows inside one shard: targets are the next token


def test_loader_is_deterministic_and_seeded(split):
    a = data.TokenBatches(split, 4, seed=3)
    b = data.TokenBatches(split, 4, seed=3)
    c = data.TokenBatches(split, 4, seed=4)
    xa = [a.next_batch()[0] for _ in range(5)]
    xb = [b.next_batch()[0] for _ in range(5)]
    xc = [c.next_batch()[0] for _ in range(5)]
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))
    assert not all(torch.equal(p, q) for p, q in zip(xa, xc))


def test_each_window_once_per_epoch(split):
    L = data.TokenBatches(split, 1, seed=9)
    N = split.n_windows
    first = [L.sample_windows(np.array([k]))[0] for k in range(N)]
    second = [L.sample_windows(np.array([k]))[0] for k in range(N, 2 * N)]
    assert sorted(first) == list(range(N)) and sorted(second) == list(range(N)) and first != second


def test_resume_mid_epoch(split):
    a = data.TokenBatches(split, 3, seed=1, grad_accum=2)
    for _ in range(3 * 2):
        a.next_batch()
    state = a.state_dict()
    assert state["consumed"] == 18
    b = data.TokenBatches(split, 3, seed=1, grad_accum=2)
    b.load_state_dict(state)
    for _ in range(8):  # crosses the epoch boundary (37 windows)
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    a.next_batch()
    with pytest.raises(RuntimeError, match="between steps"):
        a.state_dict()
    other = data.TokenSplit(split.data_dir, "train", block_size=9)
    with pytest.raises(DataError, match="block_size"):
        data.TokenBatches(other, 3).load_state_dict(state)


def test_ranks_split_the_global_batch(split):
    """2 ranks x B=2 see exactly the samples of 1 rank x B=4, step by step, with accumulation."""
    one = data.TokenBatches(split, 4, seed=5, grad_accum=2)
    r0 = data.TokenBatches(split, 2, seed=5, rank=0, world_size=2, grad_accum=2)
    r1 = data.TokenBatches(split, 2, seed=5, rank=1, world_size=2, grad_accum=2)
    for _ in range(6):
        # one step = 2 micro-batches; globally 8 samples in both cases
        single = torch.cat([one.next_batch()[0] for _ in range(2)])
        multi = torch.cat([torch.cat([r0.next_batch()[0], r1.next_batch()[0]]) for _ in range(2)])
        assert torch.equal(single, multi)


def test_eval_windows_cover_and_balance(split):
    all_w = np.concatenate([data.eval_windows(split, 20, r, 3) for r in range(3)])
    assert len(all_w) == 18 and len(set(all_w.tolist())) == 18  # rounded to a multiple of the world size
    assert all(len(data.eval_windows(split, 20, r, 3)) == 6 for r in range(3))
    assert data.eval_windows(split, 1000, 0, 1).tolist() == list(range(split.n_windows))


def test_too_small_split_is_a_clear_error(split):
    with pytest.raises(DataError, match="too few"):
        data.TokenSplit(split.data_dir, "train", block_size=500)

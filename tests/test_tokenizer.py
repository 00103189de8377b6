"""Byte-level BPE tokenizer: exact round trips of any UTF-8 text, save/load, GPT-2 files."""
import json
import os
import random

import pytest

from gptkernels.gpt.tokenizer import EOS_TOKEN, Tokenizer, TokenizerError

CORPUS = [
    "def hello(name):\n    return f'hello {name}'\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "import os\nimport sys\n\nclass Foo:\n    pass\n" * 10,
    "日本語のテキストと中文文本。한국어 텍스트. " * 5,
    "emoji 🎉🚀 and accents: café, naïve, Ångström. " * 5,
]

AWKWARD = [
    "",
    " ",
    "\n\n\t  \r\n",
    "héllo wörld",
    "日本語 中文 한국어",
    "🎉👩‍👩‍👧‍👦🏳️‍🌈 (ZWJ sequences)",
    "control: \x00\x01\x02\x07\x08\x1b[31mred\x1b[0m\x7f\x9f",
    "combining: e\u0301 a\u0308 \u200b\u200d\ufeff",
    "rtl: שלום مرحبا",
    "math: ∑∫√∞ ≠ ≤ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    f"literal special token: {EOS_TOKEN} inside text {EOS_TOKEN}{EOS_TOKEN}",
    "<|endoftext",
    "x" * 5000,
    "   leading and trailing spaces   ",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(iter(CORPUS), vocab_size=400)


def test_train_vocab_and_eos(tok):
    assert 257 <= tok.vocab_size <= 400
    assert tok.eos_id is not None and tok.id_to_token(tok.eos_id) == EOS_TOKEN
    assert tok.decode([tok.eos_id]) == EOS_TOKEN
    # Merges were learned: common text compresses below one token per byte.
    text = CORPUS[1]
    assert len(tok.encode(text)) < 0.6 * len(text.encode())


@pytest.mark.parametrize("text", AWKWARD, ids=range(len(AWKWARD)))
def test_round_trip_awkward(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    ranges = [(0x0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
    for _ in range(200):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
        s = "".join(chars)
        assert tok.decode(tok.encode(s)) == s, repr(s)


def test_encode_batch_matches_encode(tok):
    texts = AWKWARD[:8]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.decode_batch(tok.encode_batch(texts)) == texts


def test_save_load(tok, tmp_path):
    p = tmp_path / "tokenizer.json"
    tok.save(str(p))
    for src in (str(p), str(tmp_path)):  # the file, or the folder holding it
        t2 = Tokenizer.load(src)
        assert t2.vocab_size == tok.vocab_size and t2.eos_id == tok.eos_id
        for s in AWKWARD:
            assert t2.encode(s) == tok.encode(s)
    assert Tokenizer.from_json_str(tok.to_json_str()).encode("abc def") == tok.encode("abc def")


def test_gpt2_vocab_and_merges_files(tok, tmp_path):
    """The GPT-2 on-disk format (vocab.json + merges.txt, as in a Hugging Face GPT-2 folder)."""
    tok._tok.model.save(str(tmp_path))  # writes vocab.json and merges.txt
    assert sorted(os.listdir(tmp_path)) == ["merges.txt", "vocab.json"]
    t2 = Tokenizer.load(str(tmp_path))
    assert t2.eos_id == tok.eos_id and t2.vocab_size == tok.vocab_size
    for s in AWKWARD:
        assert t2.encode(s) == tok.encode(s)
        assert t2.decode(t2.encode(s)) == s


def test_gpt2_files_match_transformers(tok, tmp_path):
    """Our reading of vocab.json + merges.txt encodes as transformers' GPT2TokenizerFast does."""
    transformers = pytest.importorskip("transformers")
    tok._tok.model.save(str(tmp_path))
    hf = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    t2 = Tokenizer.load(str(tmp_path))
    for s in AWKWARD[1:10] + CORPUS:
        assert t2.encode(s) == hf.encode(s), repr(s)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(iter(["abc"]), vocab_size=100)
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load(str(tmp_path / "missing.json"))
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.load(str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.load(str(bad))
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match="end-of-text"):
        Tokenizer.load(str(tmp_path))


def test_encode_rejects_non_str():
    t = Tokenizer.train(iter(CORPUS[:1]), vocab_size=260)
    with pytest.raises(TypeError, match="text"):
        t.encode(b"bytes")

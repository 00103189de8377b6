"""Byte-level BPE tokenizer (GPT-2 style), built on the Hugging Face `tokenizers` library.

Byte-level means every UTF-8 byte has a token of its own before any merge, so any text (emoji,
CJK, control characters, invalid-looking mixes) encodes without an unknown token and decodes
back to exactly the same string.

  tok = Tokenizer.train(texts, vocab_size=4096)     # from an iterator of strings (streamed)
  tok = Tokenizer.load("tokenizer.json")            # a file written by save() or by Hugging Face
  tok = Tokenizer.load("path/to/gpt2")              # a checkpoint dir: tokenizer.json, or
                                                    #   vocab.json + merges.txt (GPT-2 format)
  ids = tok.encode("hello")                         # list[int]
  tok.decode(ids) == "hello"
  tok.encode_batch([...]); tok.vocab_size; tok.eos_id; tok.save("tokenizer.json")

The end-of-text token ("<|endoftext|>", GPT-2's id 50256) separates documents in the token
stream. If the text itself contains the literal string "<|endoftext|>" it encodes to that token
and decodes back to the same string, so round-trips stay exact.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

from gptkernels.gpt.atomic import AtomicFile

EOS_TOKEN = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer file that is missing or cannot be read."""


class Tokenizer:
    """A byte-level BPE tokenizer: a thin wrapper over `tokenizers.Tokenizer`."""

    def __init__(self, hf_tokenizer, eos_token: str = EOS_TOKEN):
        self._tok = hf_tokenizer
        self.eos_token = eos_token
        self.eos_id = hf_tokenizer.token_to_id(eos_token)
        if self.eos_id is None:
            raise TokenizerError(f"tokenizer has no end-of-text token {eos_token!r}")

    # ---- construction --------------------------------------------------------------------

    @staticmethod
    def _byte_level(model):
        from tokenizers import Tokenizer as HFTokenizer, decoders, pre_tokenizers
        tok = HFTokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        return tok

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
              eos_token: str = EOS_TOKEN, length: int | None = None, show_progress: bool = False) -> "Tokenizer":
        """Learn BPE merges from an iterator of strings (consumed once, streamed). vocab_size counts
        the 256 byte tokens and the end-of-text token, so it must be at least 257."""
        from tokenizers import models, pre_tokenizers, trainers
        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(f"vocab_size: expected an integer >= 257 (256 bytes + end-of-text), got {vocab_size!r}")
        tok = cls._byte_level(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[eos_token],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=show_progress)
        tok.train_from_iterator(texts, trainer=trainer, length=length)
        return cls(tok, eos_token)

    @classmethod
    def from_gpt2_files(cls, vocab_json: str, merges_txt: str, eos_token: str = EOS_TOKEN) -> "Tokenizer":
        """GPT-2's vocab.json + merges.txt (as in a Hugging Face GPT-2 checkpoint dir)."""
        from tokenizers import AddedToken, models
        for p in (vocab_json, merges_txt):
            if not os.path.isfile(p):
                raise TokenizerError(f"tokenizer file not found: {p}")
        try:
            tok = cls._byte_level(models.BPE.from_file(vocab_json, merges_txt))
        except Exception as e:  # the library raises plain Exceptions on malformed files
            raise TokenizerError(f"cannot read GPT-2 tokenizer files {vocab_json}, {merges_txt}: {e}") from None
        if tok.token_to_id(eos_token) is None:
            raise TokenizerError(f"{vocab_json} has no end-of-text token {eos_token!r}")
        tok.add_special_tokens([AddedToken(eos_token, special=True, normalized=False)])
        return cls(tok, eos_token)

    @classmethod
    def from_json_str(cls, s: str, eos_token: str | None = None) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        try:
            tok = HFTokenizer.from_str(s)
        except Exception as e:
            raise TokenizerError(f"not a valid tokenizer.json: {e}") from None
        return cls(tok, eos_token or _guess_eos(tok))

    @classmethod
    def load(cls, path: str, eos_token: str | None = None) -> "Tokenizer":
        """From a tokenizer.json file, or a directory holding tokenizer.json or vocab.json + merges.txt."""
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, "tokenizer.json")):
                path = os.path.join(path, "tokenizer.json")
            elif os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path, "merges.txt")):
                return cls.from_gpt2_files(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"),
                                           eos_token or EOS_TOKEN)
            else:
                raise TokenizerError(f"{path}: no tokenizer.json, and no vocab.json + merges.txt")
        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read the tokenizer file {path}: {getattr(e, 'strerror', None) or e}") from None
        try:
            return cls.from_json_str(text, eos_token)
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None

    def save(self, path: str) -> None:
        """Write tokenizer.json (readable by `tokenizers` and Hugging Face transformers), atomically."""
        with AtomicFile(path) as f:
            f.write(self._tok.to_str(pretty=True).encode("utf-8"))

    def to_json_str(self) -> str:
        return self._tok.to_str()

    # ---- use -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the largest id + 1), special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        check_text("text", text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes in parallel (the library's Rust thread pool)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_batch(self, batch) -> list[str]:
        return self._tok.decode_batch([[int(i) for i in ids] for ids in batch], skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}:{self.eos_id})"


def check_text(name: str, text: str) -> str:
    """TokenizerError naming `name` unless text is valid Unicode: a command-line argument holding
    bytes that are not UTF-8 arrives as a str with lone surrogates, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        raise TokenizerError(f"{name}: not valid UTF-8 text ({byte} at character {e.start})") from None
    return text


def _guess_eos(tok) -> str:
    """The end-of-text token of a tokenizer.json: GPT-2's if present, else its single special token."""
    if tok.token_to_id(EOS_TOKEN) is not None:
        return EOS_TOKEN
    added = json.loads(tok.to_str()).get("added_tokens", [])
    specials = [a["content"] for a in added if a.get("special")]
    for cand in ("</s>", "<|end_of_text|>", "<eos>", "[SEP]"):
        if cand in specials:
            return cand
    if len(specials) == 1:
        return specials[0]
    raise TokenizerError(f"cannot tell which token ends a document (special tokens: {specials}); "
                         "pass eos_token explicitly")

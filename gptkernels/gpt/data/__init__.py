"""Token data: text corpus -> byte-level BPE -> token shards -> (B, T) training batches.

  shards.py        the shard file format and the dataset folder (meta.json); DataError
  corpus.py        reading text files and JSONL into documents (streamed)
  preparation.py   prepare(): tokenizer, train/val split, shards
  bundled.py       the bundled corpus (the Python standard library's source), prepared into the cache
  loader.py        memory-mapped splits and the deterministic, resumable batch order
"""
from gptkernels.gpt.data.bundled import DEFAULT_CORPORA, cache_dir, default_dataset, stdlib_dir, stdlib_files
from gptkernels.gpt.data.corpus import CorpusStats, iter_documents, list_corpus_files
from gptkernels.gpt.data.loader import (TokenBatches, TokenSplit, batched, eval_windows, feistel_permute,
                                        load_tokenizer, to_device)
from gptkernels.gpt.data.preparation import prepare
from gptkernels.gpt.data.shards import (HEADER_BYTES, META_FORMAT, DataError, ShardWriter, TooShortError,
                                        dtype_for_vocab, load_meta, open_shard, read_header, write_shard)

__all__ = ["DataError", "ShardWriter", "write_shard", "read_header", "open_shard", "dtype_for_vocab", "load_meta",
           "HEADER_BYTES", "META_FORMAT", "CorpusStats", "iter_documents", "list_corpus_files", "prepare",
           "default_dataset", "stdlib_files", "stdlib_dir", "cache_dir", "TokenSplit", "TokenBatches",
           "eval_windows", "feistel_permute", "batched", "to_device", "TooShortError", "load_tokenizer", "DEFAULT_CORPORA"]

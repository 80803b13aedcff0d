"""Token caches: text rows tokenized once into a flat memory-mapped array, then cut into training sequences.

    cache = build_token_cache("data/prepared/pretrain-default/train.jsonl", tokenizer)
    data = PackedTokenDataset(cache, seq_len=256)      # data[i] = {"input_ids": [256], "labels": [256]}

The cache of FILE is FILE.<tokenizer fingerprint>.tokens (uint16 when the vocabulary fits, else uint32) with a JSON
description beside it (.tokens.json: the source's sha256, the tokenizer's, the dtype and the token count). It is
reused while the source file's bytes and the tokenizer are unchanged, and rebuilt otherwise. Both files are written
to temporary names and renamed, the description last, so a reader never sees a half-written cache.

Packing (as GPT-2 and nanoGPT do): documents are laid back to back, each followed by <|endoftext|>, and the stream
is cut into sequences of seq_len tokens without regard to document boundaries; the model learns that a new
document starts after <|endoftext|>. Every token is a target: labels equal input_ids (the model shifts them).
"""

import hashlib
import json
import os

import numpy as np
import torch

from minitrain.dataset.files import file_sha256
from minitrain.dataset.jsonl import DataError, iter_rows

CACHE_VERSION = 1
BATCH_ROWS = 1024     # rows tokenized per call of the (multi-threaded) tokenizer




def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.hf.to_str().encode()).hexdigest()[:16]


def cache_paths(path: str, tokenizer) -> tuple[str, str]:
    tokens = f"{path}.{tokenizer_fingerprint(tokenizer)}.tokens"
    return tokens, tokens + ".json"


def read_meta(meta_path: str) -> dict | None:
    try:
        with open(meta_path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def build_token_cache(path: str, tokenizer) -> str:
    """Tokenize the {"text"} rows of a JSONL file into its token cache (unless a current one exists); return the
    cache path."""
    tokens_path, meta_path = cache_paths(path, tokenizer)
    source_sha = file_sha256(path)
    meta = read_meta(meta_path)
    if (meta and meta.get("version") == CACHE_VERSION and meta.get("source_sha256") == source_sha
            and os.path.isfile(tokens_path)
            and os.path.getsize(tokens_path) == meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize):
        return tokens_path
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    tmp = f"{tokens_path}.tmp-{os.getpid()}"
    num_tokens = num_docs = 0
    try:
        with open(tmp, "wb") as out:
            batch = []
            for row in iter_rows(path):
                if row.data is None or not isinstance(row.data.get("text"), str):
                    raise DataError(f"{row.where}: field 'text' (a string) is missing")
                batch.append(row.data["text"])
                if len(batch) == BATCH_ROWS:
                    num_tokens += write_documents(out, tokenizer, batch, dtype)
                    num_docs, batch = num_docs + len(batch), []
            if batch:
                num_tokens += write_documents(out, tokenizer, batch, dtype)
                num_docs += len(batch)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, tokens_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    meta = {"version": CACHE_VERSION, "source": os.path.abspath(path), "source_sha256": source_sha,
            "tokenizer": tokenizer_fingerprint(tokenizer), "dtype": np.dtype(dtype).name, "num_tokens": num_tokens,
            "num_documents": num_docs, "separator": tokenizer.pad_id}
    tmp_meta = f"{meta_path}.tmp-{os.getpid()}"
    with open(tmp_meta, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp_meta, meta_path)
    return tokens_path


def write_documents(out, tokenizer, texts: list[str], dtype) -> int:
    """Append each document's ids followed by the separator; return the number of tokens written. Long documents
    are tokenized and written piece by piece (Tokenizer.encode_pieces), so memory does not grow with a row's size."""
    written = 0
    for _, ids, last in tokenizer.encode_pieces(texts):
        if last:
            ids = ids + [tokenizer.pad_id]
        np.asarray(ids, dtype=dtype).tofile(out)
        written += len(ids)
    return written


class PackedTokenDataset:
    """Fixed-length sequences of a token cache: sequence i is tokens [i * seq_len, (i + 1) * seq_len)."""

    def __init__(self, tokens_path: str, seq_len: int):
        meta = read_meta(tokens_path + ".json")
        if meta is None:
            raise DataError(f"{tokens_path}.json: token cache description not found")
        self.seq_len = seq_len
        self.num_tokens = meta["num_tokens"]
        self.tokens = (np.memmap(tokens_path, dtype=meta["dtype"], mode="r") if self.num_tokens
                       else np.zeros(0, dtype=meta["dtype"]))

    def __len__(self) -> int:
        return self.num_tokens // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        chunk = torch.from_numpy(self.tokens[i * self.seq_len:(i + 1) * self.seq_len].astype(np.int64))   # [T]
        return {"input_ids": chunk, "labels": chunk}

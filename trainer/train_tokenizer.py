"""Train the byte-level BPE tokenizer that ships in dataset/tokenizer/.

Commands, from the repository root after `pip install -e .`:

    # the shipped tokenizer: 6400 tokens from the embedded pretrain and SFT data (built first when missing)
    python trainer/train_tokenizer.py --out_dir dataset/tokenizer

    # your own corpus: JSONL rows with a "text" string or a "messages" list
    python trainer/train_tokenizer.py --data_path my_corpus.jsonl --vocab_size 32000 --out_dir out/tokenizer

The tokenizer (tokenizers library):
  model          BPE over bytes: every string encodes, nothing is unknown, decode(encode(s)) == s.
  pre-tokenizer  digits split one by one (Digits), then GPT-2's byte-level split (ByteLevel, no prefix space).
                 One token per digit makes every number spell out the same way, which is what small models need to
                 learn arithmetic (a merged "42" would be an unrelated symbol to "4" and "2").
  special        <|endoftext|> (id 0, padding and document separator), <|im_start|> (1), <|im_end|> (2): the
                 chat format of model/tokenizer.py.
  tags           <think>, </think>, <answer>, </answer> are added tokens (the last four ids, not special: decoding
                 keeps them), so the response format costs one token per tag.
Writes OUT_DIR/tokenizer.json and OUT_DIR/tokenizer_config.json (with the chat template) via model.tokenizer.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from minitrain.dataset.embedded import ensure_embedded_data
from minitrain.model.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError, render_chat_text

TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]


class InputError(Exception):
    """A training file that cannot be read; the message names the file and line."""


def read_texts(path: str) -> list[str]:
    """The text of each row: "text" as is, "messages" rendered in the chat format (so the markers are seen)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    texts = []
    with open(path, "rb") as f:   # bytes, decoded line by line, so that bad UTF-8 is reported with its line
        for line_number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{line_number}: not valid UTF-8 (byte {e.start + 1} of the line: "
                                 f"{e.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path}:{line_number}: not valid JSON ({e})") from None
            if isinstance(row, dict) and isinstance(row.get("text"), str):
                texts.append(row["text"])
            elif isinstance(row, dict) and isinstance(row.get("messages"), list) and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in row["messages"]):
                try:
                    texts.append(render_chat_text(row["messages"])[0])
                except TokenizerError as e:   # a role outside the chat format
                    raise InputError(f"{path}:{line_number}: field \"messages\": {e}") from None
            else:
                raise InputError(f"{path}:{line_number}: field \"text\" (a string) or \"messages\" (a list of "
                                 f"{{\"role\", \"content\"}} strings) is missing")
    if not texts:
        raise InputError(f"{path}: no rows")
    return texts


def check_out_dir(out_dir: str) -> None:
    """Fail early (before training, which can take minutes) when `out_dir` cannot become a directory; nothing is
    created yet, so a run that fails on its data leaves no trace."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"--out_dir {out_dir}: exists and is not a directory")
    ancestor = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise InputError(f"--out_dir {out_dir}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK):
        raise InputError(f"--out_dir {out_dir}: {ancestor} is not writable")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error: ...` line with exit status 2, like every other bad input."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_tokenizer() -> HFTokenizer:
    """An untrained byte-level BPE with the digit-splitting pre-tokenizer."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int = 2) -> HFTokenizer:
    """Byte-level BPE trained on `texts`: SPECIAL_TOKENS at ids 0.., TAG_TOKENS the last ids, vocab_size in all."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + len(TAG_TOKENS):
        raise InputError(f"--vocab_size {vocab_size}: must hold the 256 bytes, the special tokens and the tags "
                         f"(at least {256 + len(SPECIAL_TOKENS) + len(TAG_TOKENS)})")
    tokenizer = build_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(TAG_TOKENS), min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TAG_TOKENS])
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description="Train the byte-level BPE tokenizer.")
    parser.add_argument("--data_path", default="", help="JSONL file of \"text\" or \"messages\" rows; empty = the "
                                                         "embedded pretrain.jsonl and sft.jsonl")
    parser.add_argument("--embedded_dir", default="data/embedded", help="where the embedded data lives (built "
                                                                         "when missing)")
    parser.add_argument("--out_dir", default="dataset/tokenizer", help="writes tokenizer.json and "
                                                                       "tokenizer_config.json here")
    parser.add_argument("--vocab_size", type=int, default=6400, help="total vocabulary, special tokens included")
    parser.add_argument("--min_frequency", type=int, default=2, help="a merge needs this many occurrences")
    args = parser.parse_args(argv)
    try:
        check_out_dir(args.out_dir)
        if args.data_path:
            texts = read_texts(args.data_path)
        else:
            paths = ensure_embedded_data(args.embedded_dir)
            texts = read_texts(paths["pretrain"]) + read_texts(paths["sft"])
        hf_tokenizer = train_tokenizer(texts, args.vocab_size, args.min_frequency)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    tokenizer = Tokenizer(hf_tokenizer)
    if [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens {SPECIAL_TOKENS} did not get ids 0..{len(SPECIAL_TOKENS) - 1}")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:   # something changed since check_out_dir
        print(f"error: --out_dir {args.out_dir}: cannot create the directory ({e.strerror})", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:   # write both files, then move them in place
        tokenizer.save(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.move(os.path.join(tmp, name), os.path.join(args.out_dir, name))

    sample = texts[: min(len(texts), 2000)]
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(sample))
    chars = sum(len(t) for t in sample)
    print(f"wrote {args.out_dir}/tokenizer.json: {tokenizer.vocab_size} tokens, trained on {len(texts)} rows "
          f"({sum(len(t) for t in texts) / 1e6:.2f} M characters); {chars / tokens:.2f} characters per token")


if __name__ == "__main__":
    main()

"""The tokenizer and the chat format.

A thin wrapper around a byte-level BPE `tokenizers.Tokenizer` (tokenizer.json) that adds what training needs:
the ids of the special tokens, and the ChatML rendering of a conversation to ids plus an assistant-token mask.

Chat format (ChatML, as Qwen uses it), one block per turn:

    <|im_start|>system\n{content}<|im_end|>\n
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n{content}<|im_end|>\n

The loss of supervised fine-tuning falls on the assistant's content and its closing <|im_end|> (so the model
learns to stop), never on the role headers or on other turns. The same template is stored as Jinja in
tokenizer_config.json (CHAT_TEMPLATE below), so that Hugging Face's `apply_chat_template` renders identical ids.
"""

import json
import os
from collections.abc import Iterator

from tokenizers import Tokenizer as HFTokenizer

PAD_TOKEN = "<|endoftext|>"      # padding and the separator between packed pretraining documents
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"            # end of a turn: the EOS of a chat model
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]   # ids 0, 1, 2 in tokenizers this repo trains
CHAT_ROLES = ("system", "user", "assistant")
PIECE_CHARS = 1 << 16             # encode_pieces: a long text is tokenized in pieces of at most this many characters
BATCH_CHARS = 1 << 18             # ... and at most this many characters at a time

# Jinja twin of Tokenizer.render_chat, stored in tokenizer_config.json for Hugging Face users.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


class TokenizerError(ValueError):
    """A tokenizer file that is missing or does not fit (the message names the file), or a conversation the chat
    format cannot render (the message names the turn and its role)."""


class Tokenizer:
    """Byte-level BPE tokenizer with ChatML rendering."""

    def __init__(self, hf_tokenizer: HFTokenizer, path: str = "<memory>"):
        self.hf = hf_tokenizer
        self.path = path
        missing = [t for t in SPECIAL_TOKENS if hf_tokenizer.token_to_id(t) is None]
        if missing:
            raise TokenizerError(f"{path}: special tokens {missing} are not in the vocabulary")
        self.pad_id = hf_tokenizer.token_to_id(PAD_TOKEN)
        self.im_start_id = hf_tokenizer.token_to_id(IM_START)
        self.eos_id = hf_tokenizer.token_to_id(IM_END)
        self.bos_id = self.im_start_id   # chat rows begin with <|im_start|>; pretraining text has no BOS

    # ---- loading ----
    @classmethod
    def from_file(cls, path: str) -> "Tokenizer":
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: tokenizer file not found")
        try:
            return cls(HFTokenizer.from_file(path), path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None

    @classmethod
    def from_dir(cls, directory: str) -> "Tokenizer":
        return cls.from_file(os.path.join(directory, "tokenizer.json"))

    def save(self, directory: str, model_max_length: int = 2048) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into `directory`."""
        self.hf.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(tokenizer_config(model_max_length), f, indent=2)

    # ---- plain text ----
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_pieces(self, texts: list[str]) -> Iterator[tuple[int, list[int], bool]]:
        """(index of the text, ids of one piece of it, whether the piece ends the text), in order, for corpora of
        any document length: tokenizing a whole 50 MB document at once holds ~170 bytes per character (offsets,
        token strings), so long texts are cut into pieces of at most PIECE_CHARS characters (before a space, where
        there is one in the piece's second half: byte-level BPE words start at a space, so the ids are those of the
        whole text, except where a cut splits a run of several spaces) and tokenized at most BATCH_CHARS characters
        at a time. Memory stays bounded whatever the row.
        """
        pieces = [(i, piece, last) for i, text in enumerate(texts) for piece, last in split_text(text)]
        start = 0
        while start < len(pieces):
            end, chars = start, 0
            while end < len(pieces) and (end == start or chars + len(pieces[end][1]) <= BATCH_CHARS):
                chars += len(pieces[end][1])
                end += 1
            encoded = self.hf.encode_batch([p for _, p, _ in pieces[start:end]], add_special_tokens=False)
            for (i, _, last), e in zip(pieces[start:end], encoded):
                yield i, e.ids, last
            start = end

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    # ---- chat ----
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Render a conversation to (ids, assistant_mask).

        assistant_mask[i] = 1 where token i belongs to an assistant turn's content or its closing <|im_end|>.
        The text is tokenized whole (never piece by piece) so the ids equal what CHAT_TEMPLATE + tokenizer.json give;
        the mask comes from each token's character offsets.
        """
        text, spans = render_chat_text(messages, add_generation_prompt)
        encoding = self.hf.encode(text, add_special_tokens=False)
        mask = [0] * len(encoding.ids)
        for i, (start, _end) in enumerate(encoding.offsets):
            for span_start, span_end in spans:
                if span_start <= start < span_end:
                    mask[i] = 1
                    break
        return encoding.ids, mask

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """Ids of a conversation followed by the header that asks the assistant to answer."""
        return self.render_chat(messages, add_generation_prompt=True)[0]


def split_text(text: str) -> Iterator[tuple[str, bool]]:
    """(piece, is the last) of a text cut into pieces of at most PIECE_CHARS characters, each cut before a space
    in the piece's second half where there is one (see Tokenizer.encode_pieces); a short text is one piece."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = text.rfind(" ", start + PIECE_CHARS // 2, start + PIECE_CHARS)
        cut = cut if cut > start else start + PIECE_CHARS
        yield text[start:cut], False
        start = cut
    yield text[start:], True


def render_chat_text(messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The ChatML string of a conversation and the character spans [start, end) of assistant content + <|im_end|>.

    Each message is {"role": one of CHAT_ROLES, "content": str}; anything else is a TokenizerError naming the turn.
    An unknown role is refused rather than rendered, since the model was never trained on it and the assistant mask
    would silently leave it out.
    """
    parts, spans, length = [], [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise TokenizerError(f"message {i}: role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(m.get("content"), str):
            raise TokenizerError(f"message {i} ({m['role']}): field 'content' must be a string, got "
                                 f"{m.get('content')!r}")
        header = f"{IM_START}{m['role']}\n"
        body = f"{m['content']}{IM_END}"
        if m["role"] == "assistant":
            spans.append((length + len(header), length + len(header) + len(body)))
        block = header + body + "\n"
        parts.append(block)
        length += len(block)
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts), spans


def tokenizer_config(model_max_length: int = 2048) -> dict:
    """tokenizer_config.json contents: special tokens and the Jinja chat template, as Hugging Face reads them."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }

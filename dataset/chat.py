"""Chat data for supervised fine-tuning: conversations -> token ids with the loss on assistant tokens only.

    data = ChatDataset("data/prepared/sft-default/train.jsonl", tokenizer, max_seq_len=512, packing=False)
    batch = collate_chat([data[0], data[1]], pad_id=tokenizer.pad_id)   # input_ids, labels, attention_mask, ...

A conversation is rendered with the tokenizer's chat template (ChatML, model/tokenizer.py) into ids and an assistant
mask; labels are the ids where the mask is 1 and -100 elsewhere, so the loss falls on the assistant's words and the
<|im_end|> that closes each assistant turn, never on the system or user turns or on the role headers.

Truncation keeps the first max_seq_len tokens. A conversation left without any assistant token to predict (a long
prompt) is dropped and counted, never trained on as a row with no targets.

Packing (optional) places whole conversations back to back in sequences of at most max_seq_len tokens, first-fit
in order of decreasing length (as TRL's "bfd" packing does). Each conversation keeps its own positions (0, 1, ...)
and attends only to itself: attention_mask numbers the documents of a row (1, 1, 2, 2, 2, 0 = padding) and the
model turns that into a block-diagonal causal mask, so packing changes the speed, not the loss.
"""

import torch

from minitrain.dataset.jsonl import DataError, read_jsonl

IGNORE_INDEX = -100


def tokenize_conversation(tokenizer, messages: list[dict], max_seq_len: int) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) of one conversation, cut to max_seq_len; None when no assistant token is left to predict.

    The model shifts labels (position t predicts labels[t + 1]), so labels[0] is never a target.
    """
    ids, mask = tokenizer.render_chat(messages)
    ids, mask = ids[:max_seq_len], mask[:max_seq_len]
    if not any(mask[1:]):
        return None
    return ids, [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]


def pack_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices whose lengths sum to at most `capacity`: first-fit over the items sorted by decreasing
    length (ties by index, so the result is deterministic)."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


class ChatDataset:
    """SFT samples of a prepared {"messages"} JSONL file, tokenized once in memory.

    len(data) samples; data[i] = {"input_ids": [T], "labels": [T], "attention_mask": [T], "position_ids": [T]} with
    T <= max_seq_len (batches are padded by collate_chat). Counts: rows, dropped (no assistant token left after
    truncation), truncated.
    """

    def __init__(self, path: str, tokenizer, max_seq_len: int, packing: bool = False):
        rows = read_jsonl(path, required={"messages": list})
        self.conversations: list[tuple[list[int], list[int]]] = []
        self.rows, self.dropped, self.truncated = len(rows), 0, 0
        for row in rows:
            encoded = tokenize_conversation(tokenizer, row["messages"], max_seq_len)
            if encoded is None:
                self.dropped += 1
                continue
            if len(encoded[0]) == max_seq_len:
                self.truncated += 1
            self.conversations.append(encoded)
        if not self.conversations:     # a prepared file holds one row per line
            others = f", nor in any of the other {len(rows) - 1} (lines 2-{len(rows)})" if len(rows) > 1 else ""
            raise DataError(f"{path}: line 1: field 'messages': no assistant token within --max_seq_len "
                            f"{max_seq_len}{others}; raise --max_seq_len or shorten the prompts")
        lengths = [len(ids) for ids, _ in self.conversations]
        self.samples = pack_first_fit(lengths, max_seq_len) if packing else [[i] for i in range(len(lengths))]
        self.lengths = [sum(lengths[c] for c in sample) for sample in self.samples]   # tokens of each sample
        self.packing = packing

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def target_tokens(self) -> int:
        return sum(sum(label != IGNORE_INDEX for label in labels) for _, labels in self.conversations)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels, documents, positions = [], [], [], []
        for number, c in enumerate(self.samples[i], start=1):
            conv_ids, conv_labels = self.conversations[c]
            ids += conv_ids
            labels += [IGNORE_INDEX] + conv_labels[1:]    # a document's first token is never predicted from the last
            documents += [number] * len(conv_ids)
            positions += list(range(len(conv_ids)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "attention_mask": torch.tensor(documents), "position_ids": torch.tensor(positions)}

    def describe(self) -> str:
        packed = f", packed into {len(self.samples):,} sequences" if self.packing else ""
        return (f"{len(self.conversations):,} conversations ({self.dropped:,} dropped: no assistant token within "
                f"max_seq_len; {self.truncated:,} truncated){packed}, {self.target_tokens:,} assistant tokens")


def collate_chat(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad samples of different lengths: input_ids with pad_id, labels with -100, attention_mask with 0."""
    T = max(len(s["input_ids"]) for s in samples)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0, "position_ids": 0}
    batch = {}
    for key, value in fill.items():
        out = torch.full((len(samples), T), value, dtype=torch.long)         # [B, T]
        for row, s in enumerate(samples):
            out[row, :len(s[key])] = s[key]
        batch[key] = out
    return batch

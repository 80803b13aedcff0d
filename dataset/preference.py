"""Preference pairs as token ids: a prompt, and for each of the chosen and rejected answers its ids and loss mask.

    data = PreferenceDataset("data/prepared/dpo-default/train.jsonl", tokenizer, max_seq_len=512)
    batch = collate_pairs([data[0], data[1]], pad_id=tokenizer.pad_id)   # [2B, T]: chosen rows, then rejected rows

A canonical pair (dataset/formats.py: prompt messages, one chosen and one rejected assistant message) becomes
prompt ids = tokenizer.chat_prompt_ids(prompt) and, for each side, what tokenizer.render_chat(prompt + [answer])
adds after them: the answer's words, its closing <|im_end|> and the newline after it. The loss mask (render_chat's
assistant mask) covers the words and <|im_end|>. A side longer than max_seq_len is cut at the end; a pair with a
side left without an answer token is dropped and counted. DPO (trainer/train_dpo.py) sums log-probabilities over the
masked tokens; the reward model (trainer/train_reward.py) reads its score at each side's last masked token, the
<|im_end|> that ends the answer, as PPO reads it on sampled completions.
"""

import torch

from minitrain.dataset.jsonl import DataError, read_jsonl


def tokenize_pair(tokenizer, row: dict, max_seq_len: int) -> dict | None:
    """{"prompt": ids, "chosen": ids, "chosen_mask": [0/1], "rejected": ..., "rejected_mask": ..., "truncated"} of
    a canonical pair, or None when a side keeps no answer token within max_seq_len.

    The answer's ids are what render_chat(prompt + [answer]) adds after the prompt ids; its mask (1 on the answer's
    words and the closing <|im_end|>, 0 on the newline after it) is render_chat's assistant mask.
    """
    prompt = tokenizer.chat_prompt_ids(row["prompt"])
    pair, truncated = {"prompt": prompt}, False
    for side in ("chosen", "rejected"):
        ids, mask = tokenizer.render_chat(row["prompt"] + row[side])
        if ids[:len(prompt)] != prompt:
            raise DataError("the prompt's tokens change when the answer follows it (the tokenizer merges across the "
                            "boundary)")
        answer, answer_mask = ids[len(prompt):], mask[len(prompt):]
        room = max_seq_len - len(prompt)
        if len(answer) > room:
            answer, answer_mask, truncated = answer[:max(room, 0)], answer_mask[:max(room, 0)], True
        if not any(answer_mask):
            return None
        pair[side], pair[f"{side}_mask"] = answer, answer_mask
    pair["truncated"] = truncated
    return pair


class PreferenceDataset:
    """Pairs of a prepared {"prompt", "chosen", "rejected"} JSONL file, tokenized once in memory.

    len(data) pairs; data[i] = {"index": row of the file, "prompt", "chosen", "chosen_mask", "rejected",
    "rejected_mask"} (lists; collate_pairs lays them out), plus "ref": [2] (reference log-prob sums of chosen and
    rejected) once set_reference has been called. Counts: rows, dropped (a side without an answer token within
    max_seq_len), truncated.
    """

    def __init__(self, path: str, tokenizer, max_seq_len: int):
        rows = read_jsonl(path, required={"prompt": list, "chosen": list, "rejected": list})
        self.path, self.pairs, self.rows = path, [], len(rows)
        self.dropped = self.truncated = 0
        for index, row in enumerate(rows):
            try:
                pair = tokenize_pair(tokenizer, row, max_seq_len)
            except DataError as e:
                raise DataError(f"{path}: line {index + 1}: {e}") from None
            if pair is None:
                self.dropped += 1
                continue
            self.truncated += pair.pop("truncated")
            self.pairs.append({"index": index, **pair})
        if not self.pairs:
            raise DataError(f"{path}: no pair keeps an answer token of both sides within --max_seq_len {max_seq_len}")
        self.lengths = [2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in self.pairs]
        self.reference: torch.Tensor | None = None      # [N, 2] reference log-prob sums, when precomputed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        if self.reference is None:
            return self.pairs[i]
        return {**self.pairs[i], "ref": self.reference[i]}

    def set_reference(self, logps: torch.Tensor) -> None:
        if logps.shape != (len(self), 2):
            raise ValueError(f"reference log-probs of shape {tuple(logps.shape)} for {len(self)} pairs")
        self.reference = logps.float()

    def describe(self) -> str:
        answer_tokens = sum(sum(p["chosen_mask"]) + sum(p["rejected_mask"]) for p in self.pairs)
        return (f"{len(self.pairs):,} pairs ({self.dropped:,} dropped: no answer token of a side within max_seq_len; "
                f"{self.truncated:,} truncated), {answer_tokens:,} answer tokens")


def collate_pairs(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of chosen and rejected sequences: rows [0, B) prompt + chosen, rows [B, 2B) prompt + rejected,
    right-padded to the longest.

    input_ids, attention_mask (1 = real token): [2B, T]; loss_mask [2B, T - 1] float, 1 where input_ids[:, t + 1]
    is an answer token the loss covers (lined up with gather_logprobs); index [B] (rows of the prepared file);
    ref [B, 2] when the dataset carries precomputed reference log-probs.
    """
    rows = [(s["prompt"] + s["chosen"], s["chosen_mask"]) for s in samples] + \
           [(s["prompt"] + s["rejected"], s["rejected_mask"]) for s in samples]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)       # [2B, T]
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)           # [2B, T]
    loss_mask = torch.zeros(len(rows), T - 1)                              # [2B, T - 1]
    for r, (ids, answer_mask) in enumerate(rows):
        P = len(ids) - len(answer_mask)                                    # prompt length of the row
        input_ids[r, :len(ids)] = torch.tensor(ids)
        attention_mask[r, :len(ids)] = 1
        loss_mask[r, P - 1:len(ids) - 1] = torch.tensor(answer_mask, dtype=torch.float)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
             "index": torch.tensor([s["index"] for s in samples])}
    if "ref" in samples[0]:
        batch["ref"] = torch.stack([s["ref"] for s in samples])           # [B, 2]
    return batch

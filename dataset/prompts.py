"""Prompt sets for online RL (GRPO, SPO, PPO) and for sampling answers (make_pairs, distillation).

    prompts = PromptDataset("data/prepared/rlaif-default/train.jsonl", tokenizer, max_prompt_length=192)
    row = prompts[i]        # {"messages", "answer", "task", "id", "meta", ...} as prepared (phase rlaif)
    prompts.ids[i]          # the chat prompt's token ids (ending with the "<|im_start|>assistant\\n" header)
    prompts.text(i)         # the last user message: what reward functions receive as the prompt
    prompts.columns([3, 7]) # {"answer": [...], "task": [...], ...}: the other fields as lists, for the rewards

Prompts longer than max_prompt_length tokens are dropped and counted (a prompt is never cut: the question would
change). Every row gets an "id" (its own, or "row-<index>") so that per-prompt state (SPO's tracker) has a key.
"""

from minitrain.dataset.jsonl import DataError, read_jsonl


class PromptDataset:
    def __init__(self, path: str, tokenizer, max_prompt_length: int):
        rows = read_jsonl(path, required={"messages": list})
        self.rows, self.ids, self.dropped = [], [], 0
        for index, row in enumerate(rows):
            ids = tokenizer.chat_prompt_ids(row["messages"])
            if len(ids) > max_prompt_length:
                self.dropped += 1
                continue
            self.rows.append({**row, "id": str(row.get("id", f"row-{index}"))})
            self.ids.append(ids)
        if not self.rows:
            raise DataError(f"{path}: no prompt fits --max_prompt_length {max_prompt_length}")
        keys = set().union(*(row.keys() for row in self.rows)) - {"messages", "source"}
        self.column_names = sorted(keys)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def text(self, i: int) -> str:
        return next(m["content"] for m in reversed(self.rows[i]["messages"]) if m["role"] == "user")

    def columns(self, indices: list[int]) -> dict[str, list]:
        """The fields of the rows other than the messages, one list per field (None where a row lacks one)."""
        return {key: [self.rows[i].get(key) for i in indices] for key in self.column_names}

    def describe(self) -> str:
        return f"{len(self.rows):,} prompts ({self.dropped:,} longer than max_prompt_length dropped)"

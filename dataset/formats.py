"""Row formats: what each training phase reads, the shapes people bring, and the one canonical shape we keep.

A source file may hold any of the shapes below; its rows are checked and rewritten to the phase's canonical row
before training, so the trainers read a single shape.

    phase               accepted rows                                                  canonical row
    pretrain, midtrain  {"text"}; any chat row below (rendered as ChatML text)         {"text"}
    sft                 {"messages": [{"role", "content"}, ...]}                       {"messages"}
                        {"conversations": [...]} with role/content or from/value keys
                        {"prompt", "response" or "completion"} (+ optional "system")
                        {"text": "\\n\\nHuman: ...\\n\\nAssistant: ..."} (Anthropic HH)
    dpo                 {"prompt", "chosen", "rejected"}, each a string or a message list {"prompt", "chosen", "rejected"}
                        (+ an optional numeric "margin", kept)
                        {"chosen", "rejected"} as conversations whose last assistant  (prompt: messages;
                        turn differs (message lists, or Anthropic-HH text)             chosen/rejected: one
                                                                                       assistant message each)
    rlaif               {"prompt": text or messages} or {"messages"}, with any other   {"messages", **other keys}
                        keys ("answer", "task", ...) kept for the reward functions

Each `normalize_<kind>(row)` returns (canonical row, "") or (None, problem); the problem names the field.
"""

import re

from minitrain.model.tokenizer import CHAT_ROLES, render_chat_text

# ShareGPT-style speaker names -> our roles
SPEAKERS = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
            "model": "assistant", "bot": "assistant", "chatgpt": "assistant"}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


# =============================================================================================================
# Conversations
# =============================================================================================================

def check_messages(messages, field: str, need_assistant: bool = True) -> str:
    """'' when `messages` is a valid conversation: a non-empty list of {"role", "content"} with a known role, string
    content, a system turn only first; with need_assistant, at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        return f"field '{field}' must be a non-empty list of turns"
    for i, m in enumerate(messages):
        where = f"field '{field}[{i}]'"
        if not isinstance(m, dict):
            return f"{where} must be an object with 'role' and 'content'"
        if "role" not in m or "content" not in m:
            return f"{where} needs 'role' and 'content'"
        if m["role"] not in CHAT_ROLES:
            return f"{where}: unknown role {m['role']!r} (expected one of {', '.join(CHAT_ROLES)})"
        if not isinstance(m["content"], str):
            return f"{where}: 'content' must be a string, got {type(m['content']).__name__}"
        if m["role"] == "system" and i > 0:
            return f"{where}: a system turn may only come first"
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return f"field '{field}' has no assistant turn"
    if need_assistant and not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
        return f"field '{field}': every assistant answer is empty (nothing to learn)"
    return ""


def sharegpt_turns(turns, field: str) -> tuple[list | None, str]:
    """{"from": "human", "value": ...} turns (or role/content ones) -> role/content messages."""
    if not isinstance(turns, list) or not turns:
        return None, f"field '{field}' must be a non-empty list of turns"
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            return None, f"field '{field}[{i}]' must be an object"
        if "role" in t and "content" in t:
            messages.append({"role": t["role"], "content": t["content"]})
            continue
        if "from" not in t or "value" not in t:
            return None, f"field '{field}[{i}]' needs 'role'/'content' or 'from'/'value'"
        speaker = str(t["from"]).lower()
        if speaker not in SPEAKERS:
            return None, f"field '{field}[{i}]': unknown speaker {t['from']!r}"
        messages.append({"role": SPEAKERS[speaker], "content": t["value"]})
    return messages, ""


def parse_hh(text: str, field: str) -> tuple[list | None, str]:
    """Anthropic-HH text "\\n\\nHuman: q\\n\\nAssistant: a..." -> messages."""
    if not isinstance(text, str):
        return None, f"field '{field}' must be a string"
    if not text.startswith("\n\n"):
        text = "\n\n" + text
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        return None, f"field '{field}' is not Human/Assistant dialogue text"
    messages = [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
                for speaker, content in zip(parts[1::2], parts[2::2])]
    return messages, ""


def is_hh_text(value) -> bool:
    return isinstance(value, str) and value.lstrip("\n").startswith("Human: ")


def conversation_of(row: dict) -> tuple[list | None, str, str]:
    """The conversation a chat row holds, in any accepted shape: (messages, field it came from, problem)."""
    if "messages" in row:
        return row["messages"], "messages", ""
    if "conversations" in row:
        messages, problem = sharegpt_turns(row["conversations"], "conversations")
        return messages, "conversations", problem
    if "prompt" in row and ("response" in row or "completion" in row):
        key = "response" if "response" in row else "completion"
        for name in ("prompt", key):
            if not isinstance(row[name], str):
                return None, name, f"field '{name}' must be a string, got {type(row[name]).__name__}"
        system = row.get("system")
        if system is not None and not isinstance(system, str):
            return None, "system", "field 'system' must be a string"
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[key]}]
        return messages, "prompt", ""
    if "text" in row and is_hh_text(row["text"]):
        messages, problem = parse_hh(row["text"], "text")
        return messages, "text", problem
    return None, "", ("no conversation: expected 'messages', 'conversations', 'prompt' + 'response', or "
                      "Human/Assistant 'text'")


# =============================================================================================================
# One normaliser per kind of phase
# =============================================================================================================

def normalize_text(row: dict) -> tuple[dict | None, str]:
    if "text" in row and not is_hh_text(row["text"]):
        if not isinstance(row["text"], str):
            return None, f"field 'text' must be a string, got {type(row['text']).__name__}"
        if not row["text"].strip():
            return None, "field 'text' is empty"
        return {"text": row["text"]}, ""
    messages, field, problem = conversation_of(row)
    if messages is None:
        return None, "field 'text' is missing" if not field else problem
    problem = problem or check_messages(messages, field)
    return (None, problem) if problem else ({"text": render_chat_text(messages)[0]}, "")


def normalize_chat(row: dict) -> tuple[dict | None, str]:
    messages, field, problem = conversation_of(row)
    if messages is None:
        return None, problem
    problem = problem or check_messages(messages, field)
    return (None, problem) if problem else ({"messages": messages}, "")


def as_messages(value, field: str, default_role: str) -> tuple[list | None, str]:
    """A preference field: a string (one turn of `default_role`), a message list, or Human/Assistant text."""
    if isinstance(value, str):
        if is_hh_text(value):
            return parse_hh(value, field)
        return [{"role": default_role, "content": value}], ""
    if isinstance(value, list):
        problem = check_messages(value, field, need_assistant=False)
        return (None, problem) if problem else (value, "")
    return None, f"field '{field}' must be a string or a list of messages, got {type(value).__name__}"


def split_pair(chosen: list, rejected: list) -> tuple[dict | None, str]:
    """Two conversations that share everything but their final assistant turn -> prompt, chosen, rejected."""
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return None, "fields 'chosen' and 'rejected' must each end with an assistant turn"
    if chosen[:-1] != rejected[:-1]:
        return None, "fields 'chosen' and 'rejected' differ before their last assistant turn"
    if not chosen[:-1]:
        return None, "fields 'chosen' and 'rejected' hold no prompt before the answer"
    return {"prompt": chosen[:-1], "chosen": [chosen[-1]], "rejected": [rejected[-1]]}, ""


def normalize_preference(row: dict) -> tuple[dict | None, str]:
    for name in ("chosen", "rejected"):
        if name not in row:
            return None, f"field '{name}' is missing"
    chosen, problem = as_messages(row["chosen"], "chosen", "assistant")
    if chosen is None:
        return None, problem
    rejected, problem = as_messages(row["rejected"], "rejected", "assistant")
    if rejected is None:
        return None, problem
    if "prompt" not in row:                    # whole conversations (chat rows, Anthropic HH)
        pair, problem = split_pair(chosen, rejected)
    else:
        prompt, problem = as_messages(row["prompt"], "prompt", "user")
        if prompt is None:
            return None, problem
        if chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt and len(chosen) > len(prompt):
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]   # answers that repeat the prompt
        if len(chosen) != 1 or len(rejected) != 1 or chosen[0]["role"] != "assistant" or \
                rejected[0]["role"] != "assistant":
            return None, "fields 'chosen' and 'rejected' must each be one assistant answer"
        if prompt[-1]["role"] != "user":
            return None, "field 'prompt' must end with a user turn"
        pair, problem = {"prompt": prompt, "chosen": chosen, "rejected": rejected}, ""
    if pair is not None and pair["chosen"][0]["content"] == pair["rejected"][0]["content"]:
        return None, "fields 'chosen' and 'rejected' hold the same answer"
    if pair is not None and "margin" in row:      # how much better chosen is (reward models' margin loss)
        if isinstance(row["margin"], bool) or not isinstance(row["margin"], (int, float)):
            return None, f"field 'margin' must be a number, got {type(row['margin']).__name__}"
        pair["margin"] = float(row["margin"])
    return pair, problem


def normalize_prompt(row: dict) -> tuple[dict | None, str]:
    extra = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
    if "messages" in row:
        messages = row["messages"]
        problem = check_messages(messages, "messages", need_assistant=False)
        if not problem and messages[-1]["role"] == "assistant":
            messages = messages[:-1]           # a reference answer at the end is not part of the prompt
            problem = "" if messages else "field 'messages' holds no prompt before the answer"
    elif "prompt" in row:
        messages, problem = as_messages(row["prompt"], "prompt", "user")
    else:
        return None, "field 'prompt' (or 'messages') is missing"
    if messages is None or problem:
        return None, problem
    if messages[-1]["role"] != "user":
        return None, "the prompt must end with a user turn"
    return {"messages": messages, **extra}, ""


PHASE_FORMATS = {"pretrain": normalize_text, "midtrain": normalize_text, "sft": normalize_chat,
                 "dpo": normalize_preference, "rlaif": normalize_prompt}
PHASES = tuple(PHASE_FORMATS)


def row_texts(phase: str, row: dict) -> list[str]:
    """The texts of a canonical row that its tokens are counted from (for the mixture summary)."""
    if phase in ("pretrain", "midtrain"):
        return [row["text"]]
    if phase == "sft":
        return [render_chat_text(row["messages"])[0]]
    if phase == "dpo":
        return [render_chat_text(row["prompt"] + row["chosen"])[0], render_chat_text(row["rejected"])[0]]
    return [render_chat_text(row["messages"], add_generation_prompt=True)[0]]

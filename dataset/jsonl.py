"""Reading JSON and JSONL files row by row, with errors that name the file, the line and the field.

Two shapes of file are accepted:
    file.jsonl   one JSON object per line (blank lines are skipped)
    file.json    one JSON array of objects (each row's line is where its object starts), or JSON lines as above:
                 a file not named .jsonl is read as an array when its first character (not whitespace) is '['.

`iter_rows` yields every row with its line number, or the problem that makes it unreadable, so that a caller can
count and skip malformed rows; `read_jsonl` is the strict reader: the first bad row is a DataError.
"""

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass


class DataError(ValueError):
    """Bad data the user can fix. The message names the file, and where it can, the line and the field."""


@dataclass
class Row:
    path: str
    line: int                 # 1-based line of the row in its file
    data: dict | None         # the parsed object, None when the line is not a JSON object
    problem: str = ""         # why `data` is None ("not valid JSON (...)", "not a JSON object")

    @property
    def where(self) -> str:
        return f"{self.path}: line {self.line}"


def check_file(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file (no rows)")


def first_character(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                return line.lstrip()[0]
    return ""


def iter_rows(path: str) -> Iterator[Row]:
    """Every row of a JSON or JSONL file in order, readable or not. Raises DataError for a missing or empty file
    (and for a JSON array that cannot be parsed at all)."""
    check_file(path)
    first = first_character(path)
    if first == "":
        raise DataError(f"{path}: empty file (no rows)")
    if first == "[" and not path.endswith(".jsonl"):
        yield from iter_json_array(path)
        return
    with open(path, encoding="utf-8", errors="strict") as f:
        line_no = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {line_no + 1}: not UTF-8 text ({e.reason})") from None
            if not line:
                return
            line_no += 1
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                yield Row(path, line_no, None, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(data, dict):
                yield Row(path, line_no, None, f"not a JSON object (a {type(data).__name__})")
                continue
            yield Row(path, line_no, data)


def iter_json_array(path: str) -> Iterator[Row]:
    """The objects of a file holding one JSON array, each with the line where it starts."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    decoder = json.JSONDecoder()
    position, line = text.index("[") + 1, 1 + text.count("\n", 0, text.index("["))

    def skip_space(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(i: int) -> int:
        nonlocal position, line
        line += text.count("\n", position, i)
        position = i
        return line

    i = skip_space(position)
    if i < len(text) and text[i] == "]":
        return
    while True:
        try:
            data, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        row_line = line_of(i)
        if isinstance(data, dict):
            yield Row(path, row_line, data)
        else:
            yield Row(path, row_line, None, f"not a JSON object (a {type(data).__name__})")
        i = skip_space(end)
        if i < len(text) and text[i] == ",":
            i = skip_space(i + 1)
            continue
        if i < len(text) and text[i] == "]":
            if text[i + 1:].strip():
                raise DataError(f"{path}: line {line_of(i)}: text after the closing ]")
            return
        raise DataError(f"{path}: line {line_of(min(i, len(text)))}: expected ',' or ']' in the JSON array")


def field_problem(data: dict, required: dict[str, type]) -> str:
    """'' when every required field is present with its type, else the first problem, naming the field."""
    for name, tp in required.items():
        if name not in data:
            return f"field '{name}' is missing"
        if not isinstance(data[name], tp) or (tp is int and isinstance(data[name], bool)):
            return f"field '{name}' must be {tp.__name__}, got {type(data[name]).__name__}"
    return ""


def read_jsonl(path: str, required: dict[str, type] | None = None, max_rows: int | None = None) -> list[dict]:
    """The rows of a JSON/JSONL file, each checked: a JSON object holding the `required` fields with their types.

    The first bad row raises DataError naming the file, line and field; so does a file with no rows.
    """
    rows = []
    for row in iter_rows(path):
        if row.data is None:
            raise DataError(f"{row.where}: {row.problem}")
        problem = field_problem(row.data, required or {})
        if problem:
            raise DataError(f"{row.where}: {problem}")
        rows.append(row.data)
        if max_rows is not None and len(rows) >= max_rows:
            break
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows

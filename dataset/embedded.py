"""The embedded data: a small corpus built on any fresh machine, deterministically, with nothing downloaded.

    python -m minitrain.dataset.embedded --out data/embedded            # writes what is missing (a few seconds)
    python -m minitrain.dataset.embedded --out data/embedded --force    # rebuilds everything

From Python code: `ensure_embedded_data(root)` -> {"pretrain": ".../pretrain.jsonl", ...}.

The one arrow from dataset/ to eval/, on purpose: the task problems come from eval/tasks/, the same generators and
checkers that evaluation uses (training problems from training seeds, held-out ones from the evaluation seed), so
the data and its evaluation can never disagree about a task. Nothing else in dataset/ imports eval/.

Files (one JSON object per line):
    pretrain.jsonl  {"text"}   Python's own documentation (the docstrings of an allowlist of standard-library
                               modules, plus the language reference topics of pydoc_data) and documents of task text:
                               plain statements ("23 + 19 = 42.") and worked examples in the think/answer format.
    midtrain.jsonl  {"text"}   task-heavy continued pretraining: conversations in the chat format (ChatML text with
                               its <|im_start|>/<|im_end|> markers, which the tokenizer encodes as special tokens),
                               worked examples, documentation rows and (a quarter as many) documentation Q&A chats.
    sft.jsonl       {"messages"}  chat rows: task problems with reference responses (arithmetic mostly, every
                               level; sat, sort, countdown), questions about the documented functions answered with
                               the first sentence of their docstring; some rows multi-turn, some with a system turn.
    dpo.jsonl       {"prompt", "chosen", "rejected"}  prompt = the user message; chosen = the reference response,
                               rejected = a near miss in the same format (scores 0.0).
    rlaif.jsonl     {"prompt", "answer", "task", "id", "meta"}  prompts with verifiable answers:
                               eval.tasks.score_row(row, completion) scores a completion.
    rlaif_level4.jsonl  the same rows, arithmetic of level 4 only (none also in rlaif.jsonl): the pairs stage's
                               prompts at the level where the pipeline's SFT model is weakest.
    rlaif_level2.jsonl  the same, arithmetic of level 2 only: the pairs stage's prompts that hold level 2 while
                               level 4 is trained, and the GRPO stage's fresh prompts.
    manifest.json   version, Python version, row counts, sizes and sha256 of each file, the options used.

Every task problem comes from a training seed (eval.tasks.training_seed), so none of them is a held-out
evaluation problem. The documentation text depends on the Python version (recorded in the manifest): two machines
with the same Python build identical files. Evaluation rows are not written here; evaluation generates them from
eval.tasks.EVAL_SEED.
"""

import argparse
import hashlib
import importlib
import inspect
import json
import os
import random
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field, fields

# Only the standard library is imported at the top: this file also runs as a child process with a bare interpreter
# (`python -I -S dataset/embedded.py --print-documentation`) that reads the docstrings, so that the documentation
# text never depends on what the calling process imported before (torch, for one, replaces inspect.getfile).
# The task generators and the chat renderer are imported where they are used.

EMBEDDED_VERSION = 5
FILES = ("pretrain", "midtrain", "sft", "dpo", "rlaif", "rlaif_level4", "rlaif_level2")

# Standard-library modules whose docstrings form the documentation corpus: pure imports without side effects (no
# windows, terminals, network or output on import). A module that fails to import or warns on import is skipped.
DOC_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmd", "codecs", "collections",
    "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email.message", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser",
    "http.client", "http.cookies", "imaplib", "importlib", "inspect", "io", "ipaddress", "itertools", "json",
    "keyword", "linecache", "locale", "logging", "logging.handlers", "lzma", "mailbox", "math", "mimetypes",
    "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib",
    "pprint", "pstats", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "smtplib", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest", "urllib.parse", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zlib", "zoneinfo",
)
UNSTABLE_TEXT = re.compile(r" at 0x[0-9a-fA-F]+|/(home|usr|tmp|opt|Users)/")   # addresses and paths vary by run/machine

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a careful assistant. Think inside <think></think>, then give the final answer inside <answer></answer>.",
    "Answer briefly.",
)


@dataclass
class EmbeddedConfig:
    """How many rows of each kind the generator writes (documentation rows: all the allowlist provides)."""

    pretrain_task_docs: int = field(default=4000, metadata={"help": "pretrain.jsonl: documents of task text (18 "
                                                                     "statements and worked examples, or 6 chats)"})
    pretrain_chat_percent: int = field(default=30, metadata={"help": "pretrain.jsonl: percent of the task documents "
                                                                     "written as conversations in the chat format"})
    midtrain_rows: int = field(default=3000, metadata={"help": "midtrain.jsonl: rows of task text and conversations"})
    midtrain_doc_rows: int = field(default=600, metadata={"help": "midtrain.jsonl: documentation rows mixed in"})
    sft_task_rows: int = field(default=3600, metadata={"help": "sft.jsonl: task conversations"})
    sft_chat_rows: int = field(default=400, metadata={"help": "sft.jsonl: questions about documented functions"})
    dpo_rows: int = field(default=2000, metadata={"help": "dpo.jsonl: preference pairs"})
    rlaif_rows: int = field(default=2000, metadata={"help": "rlaif.jsonl: prompts with verifiable answers"})
    rlaif_level4_rows: int = field(default=1500, metadata={
        "help": "rlaif_level4.jsonl: more arithmetic prompts of level 4, the hardest, none also in rlaif.jsonl"})
    rlaif_level2_rows: int = field(default=2000, metadata={
        "help": "rlaif_level2.jsonl: more arithmetic prompts of level 2 (two-digit sums and differences), none also "
                "in rlaif.jsonl"})

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is not int or value < 0:
                raise ValueError(f"EmbeddedConfig.{f.name} must be a non-negative integer, got {value!r}")


# Which of the config's fields each file depends on (a file is rebuilt when they change).
FILE_OPTIONS = {
    "pretrain": ("pretrain_task_docs", "pretrain_chat_percent"),
    "midtrain": ("midtrain_rows", "midtrain_doc_rows"),
    "sft": ("sft_task_rows", "sft_chat_rows"),
    "dpo": ("dpo_rows",),
    "rlaif": ("rlaif_rows",),
    "rlaif_level4": ("rlaif_rows", "rlaif_level4_rows"),     # they leave out rlaif.jsonl's prompts
    "rlaif_level2": ("rlaif_rows", "rlaif_level2_rows"),
}
# The training seed index of each file: the files draw different problems from the training partition.
FILE_SEEDS = {"pretrain": 0, "midtrain": 1, "sft": 2, "dpo": 3, "rlaif": 4, "rlaif_level4": 5, "rlaif_level2": 6}
# The files of one arithmetic level each, and their level.
RLAIF_LEVEL_FILES = {"rlaif_level4": 4, "rlaif_level2": 2}

# Task mixtures: (task spec, weight). Arithmetic dominates; every level appears (level 0 draws 1-4).
TASK_MIX = (("arithmetic", 0.40), ("arithmetic:level=1", 0.10), ("arithmetic:level=2", 0.10),
            ("arithmetic:level=3", 0.05), ("arithmetic:level=4", 0.05), ("sat:n_vars=3", 0.04), ("sat", 0.05),
            ("sat:n_vars=5", 0.03), ("sort:length=3", 0.03), ("sort", 0.05), ("sort:length=7", 0.02),
            ("countdown:count=3", 0.04), ("countdown", 0.04))


# =============================================================================================================
# Documentation text
# =============================================================================================================

@dataclass
class DocEntry:
    title: str      # "json.dumps", "module json", "json.JSONEncoder"
    kind: str       # "module", "class", "function", "topic"
    text: str       # the document: header line and docstring(s)
    summary: str    # first sentence of the docstring ("" when it has none usable)


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, whitespace collapsed; "" when it is not prose."""
    paragraph = " ".join(doc.strip().split("\n\n", 1)[0].split())
    match = re.match(r"(.+?\.)(\s|$)", paragraph)
    sentence = match.group(1) if match else ""
    words = sentence.split()
    if not (20 <= len(sentence) <= 300 and len(words) >= 3 and re.fullmatch(r"[A-Z][a-z]+,?", words[0])):
        return ""            # not prose: a signature, a code line, a fragment
    return "" if "``" in sentence or ">>>" in sentence else sentence


def is_unstable(text: str) -> bool:
    """Text that differs between runs or machines: object addresses, common absolute paths, and this interpreter's
    own paths (a default argument may hold sys.executable, e.g. platform.architecture's)."""
    own_paths = {p for p in (sys.executable, sys.prefix, sys.base_prefix) if p}
    return bool(UNSTABLE_TEXT.search(text)) or any(p in text for p in own_paths)


def signature_text(obj) -> str:
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return "(...)" if is_unstable(text) or len(text) > 200 else text


def import_quietly(name: str):
    """The module, or None when it fails to import or warns while importing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            module = importlib.import_module(name)
        except Exception:
            return None
    return None if caught else module


def stable(text: str) -> bool:
    return not is_unstable(text)


def own_doc(obj) -> str:
    """The object's own docstring, cleaned (inspect.getdoc would fall back to a base class's); "" when reading it
    warns (deprecated aliases such as typing.io)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and not caught else ""


def documentation() -> list[DocEntry]:
    """The documentation entries, read by a fresh interpreter that imports nothing but the standard library."""
    command = [sys.executable, "-I", "-S", os.path.abspath(__file__), "--print-documentation"]
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8")
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{os.path.abspath(__file__)}: reading the standard library documentation failed: {tail}")
    return [DocEntry(**entry) for entry in json.loads(result.stdout)]


def read_documentation() -> list[DocEntry]:
    """Docstrings of DOC_MODULES (module, then its public classes with their methods, then functions, in sorted
    order) and the language reference topics of pydoc_data, read in this process."""
    entries = []
    for name in sorted(DOC_MODULES):
        module = import_quietly(name)
        if module is None:
            continue
        doc = own_doc(module)
        if doc and stable(doc):
            entries.append(DocEntry(f"module {name}", "module", f"Module {name}\n\n{doc}", first_sentence(doc)))
        for attr in sorted(vars(module)):
            obj = vars(module)[attr]
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isclass(obj):
                entry = class_entry(name, attr, obj)
            elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                doc = own_doc(obj)
                if not doc or not stable(doc):
                    continue
                entry = DocEntry(f"{name}.{attr}", "function", f"{name}.{attr}{signature_text(obj)}\n\n{doc}",
                                 first_sentence(doc))
            else:
                continue
            if entry is not None:
                entries.append(entry)
    topics = import_quietly("pydoc_data.topics")
    if topics is not None:
        for key in sorted(topics.topics):
            text = topics.topics[key].strip()
            if text and stable(text):
                entries.append(DocEntry(f"topic {key}", "topic", text, ""))
    return entries


def class_entry(module: str, name: str, cls) -> DocEntry | None:
    doc = own_doc(cls)
    if not doc or not stable(doc):
        return None
    parts = [f"class {module}.{name}\n\n{doc}"]
    for attr in sorted(vars(cls)):
        member = vars(cls)[attr]
        if attr.startswith("_"):
            continue
        if isinstance(member, (classmethod, staticmethod)):
            member = member.__func__
        if not (inspect.isfunction(member) or isinstance(member, property)):
            continue
        member_doc = own_doc(member)
        if member_doc and stable(member_doc):
            header = f"{name}.{attr}" + ("" if isinstance(member, property) else signature_text(member))
            parts.append(f"{header}\n\n{member_doc}")
    return DocEntry(f"{module}.{name}", "class", "\n\n".join(parts), first_sentence(doc))


# =============================================================================================================
# Task text
# =============================================================================================================

def task_stream(file: str, count: int) -> list[tuple]:
    """`count` (task, problem) pairs in TASK_MIX proportions, shuffled, from the file's training seed."""
    from minitrain.eval.tasks import get_task, training_seed
    total = sum(weight for _, weight in TASK_MIX)
    exact = [count * weight / total for _, weight in TASK_MIX]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])   # largest remainder first
    for i in by_remainder[:count - sum(counts)]:
        counts[i] += 1
    pairs = []
    for (spec, _), n in zip(TASK_MIX, counts):
        task = get_task(spec)
        pairs += [(task, p) for p in task.make_problems(n, training_seed(FILE_SEEDS[file]))]
    random.Random(f"embedded/{file}/shuffle").shuffle(pairs)
    return pairs


def worked_example(task, problem) -> str:
    return f"Question: {problem.question}\nAnswer: {task.reference_response(problem)}"


def task_document(items: list[tuple], rng: random.Random) -> str:
    """Statements and worked examples, one per line (worked examples are multi-line), in a random mix."""
    lines = [task.statement(p) if rng.random() < 0.5 else worked_example(task, p) for task, p in items]
    return "\n".join(lines)


def chunks(items: list, rng: random.Random, low: int, high: int) -> list[list]:
    out, i = [], 0
    while i < len(items):
        size = rng.randint(low, high)
        out.append(items[i:i + size])
        i += size
    return out


# =============================================================================================================
# The five files
# =============================================================================================================

def pretrain_rows(cfg: EmbeddedConfig, docs: list[DocEntry]) -> list[dict]:
    """The documentation, and task documents: statements and worked examples, or (pretrain_chat_percent of them)
    conversations in the chat format, so that a pretrained model already knows how a question is asked and answered
    and supervised fine-tuning sharpens rather than teaches the format."""
    from minitrain.model.tokenizer import render_chat_text
    rng = random.Random("embedded/pretrain")
    rows = [{"text": entry.text} for entry in docs]
    per_doc = 18
    items = task_stream("pretrain", cfg.pretrain_task_docs * per_doc)
    for i in range(cfg.pretrain_task_docs):
        chunk = items[i * per_doc:(i + 1) * per_doc]
        if rng.randrange(100) < cfg.pretrain_chat_percent:     # six conversations of one to three turns
            chats = [conversation(chunk[k:k + rng.randint(1, 3)], rng) for k in range(0, per_doc, 3)]
            rows.append({"text": "".join(render_chat_text(chat)[0] for chat in chats)})
        else:
            rows.append({"text": task_document(chunk, rng)})
    rng.shuffle(rows)
    return rows


def conversation(items: list[tuple], rng: random.Random) -> list[dict]:
    """A chat of one or more task turns, sometimes opened by a system turn."""
    messages = []
    if rng.random() < 0.25:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for task, problem in items:
        messages.append({"role": "user", "content": problem.question})
        messages.append({"role": "assistant", "content": task.reference_response(problem)})
    return messages


def doc_chats(docs: list[DocEntry], count: int, rng: random.Random) -> list[list[dict]]:
    """Questions about documented functions and classes, answered with the first sentence of their docstring."""
    candidates = [d for d in docs if d.summary and d.kind in ("function", "class")]
    rng.shuffle(candidates)
    chats = []
    for entry in candidates[:count]:
        noun = "function" if entry.kind == "function" else "class"
        question = rng.choice((f"What does the {noun} {entry.title} do?", f"What is {entry.title} for?",
                               f"Explain {entry.title} in one sentence."))
        messages = [{"role": "system", "content": SYSTEM_PROMPTS[0]}] if rng.random() < 0.3 else []
        chats.append(messages + [{"role": "user", "content": question},
                                 {"role": "assistant", "content": entry.summary}])
    return chats


def midtrain_rows(cfg: EmbeddedConfig, docs: list[DocEntry]) -> list[dict]:
    from minitrain.model.tokenizer import render_chat_text
    rng = random.Random("embedded/midtrain")
    items = task_stream("midtrain", cfg.midtrain_rows * 4)
    rows = []
    for i in range(cfg.midtrain_rows):
        group = items[i * 4:(i + 1) * 4]
        if rng.random() < 0.6:       # a conversation in the chat format, one to four turns
            text, _ = render_chat_text(conversation(group[:rng.randint(1, 4)], rng))
        else:
            text = "\n".join(worked_example(task, p) for task, p in group)
        rows.append({"text": text})
    doc_rows = [{"text": d.text} for d in docs]
    rng.shuffle(doc_rows)
    rows += doc_rows[:cfg.midtrain_doc_rows]
    rows += [{"text": render_chat_text(chat)[0]} for chat in doc_chats(docs, cfg.midtrain_doc_rows // 4, rng)]
    rng.shuffle(rows)
    return rows


def sft_rows(cfg: EmbeddedConfig, docs: list[DocEntry]) -> list[dict]:
    rng = random.Random("embedded/sft")
    items = task_stream("sft", cfg.sft_task_rows * 3)
    rows, position = [], 0
    for _ in range(cfg.sft_task_rows):
        turns = 1 if rng.random() < 0.85 else rng.randint(2, 3)      # ~15% multi-turn
        rows.append({"messages": conversation(items[position:position + turns], rng)})
        position += turns
    rows += [{"messages": chat} for chat in doc_chats(docs, cfg.sft_chat_rows, random.Random("embedded/sft/docs"))]
    rng.shuffle(rows)
    return rows


def dpo_rows(cfg: EmbeddedConfig) -> list[dict]:
    rng = random.Random("embedded/dpo")
    return [{"prompt": p.question, "chosen": task.reference_response(p), "rejected": task.wrong_response(p, rng)}
            for task, p in task_stream("dpo", cfg.dpo_rows)]


def rlaif_row(p) -> dict:
    return {"prompt": p.question, "answer": p.answer, "task": p.task, "id": p.id, "meta": p.meta}


def rlaif_rows(cfg: EmbeddedConfig) -> list[dict]:
    return [rlaif_row(p) for _task, p in task_stream("rlaif", cfg.rlaif_rows)]


def rlaif_level_rows(cfg: EmbeddedConfig, name: str) -> list[dict]:
    """The rows of rlaif_level4.jsonl or rlaif_level2.jsonl: distinct arithmetic prompts of one level from the
    file's own training seed, in rlaif.jsonl's row format, leaving out the prompts rlaif.jsonl already holds.
    rlaif.jsonl has about 300 prompts of each level; the pipeline's pairs stage samples answers to these too: level
    4 is where the SFT model has the most to learn, and the level-2 pairs hold level 2 while it does (README
    "Results")."""
    from minitrain.eval.tasks import get_task, training_seed
    level, count = RLAIF_LEVEL_FILES[name], getattr(cfg, f"{name}_rows")
    seen = {p.question for _task, p in task_stream("rlaif", cfg.rlaif_rows)}
    task, rows = get_task(f"arithmetic:level={level}"), []
    for p in task.make_problems(4 * count, training_seed(FILE_SEEDS[name])):
        if len(rows) < count and p.question not in seen:
            seen.add(p.question)
            rows.append(rlaif_row(p))
    if len(rows) < count:
        raise ValueError(f"EmbeddedConfig.{name}_rows: only {len(rows)} distinct level-{level} training prompts "
                         f"found, {count} asked for")
    return rows


def build_rows(name: str, cfg: EmbeddedConfig, docs_cache: list) -> list[dict]:
    if name in ("pretrain", "midtrain", "sft") and not docs_cache:
        docs_cache.extend(documentation())
    if name == "pretrain":
        return pretrain_rows(cfg, docs_cache)
    if name == "midtrain":
        return midtrain_rows(cfg, docs_cache)
    if name == "sft":
        return sft_rows(cfg, docs_cache)
    if name == "dpo":
        return dpo_rows(cfg)
    if name == "rlaif":
        return rlaif_rows(cfg)
    return rlaif_level_rows(cfg, name)


# =============================================================================================================
# Writing: atomic files and the manifest
# =============================================================================================================



def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def file_entry(name: str, cfg: EmbeddedConfig, data: bytes, rows: int) -> dict:
    return {"path": f"{name}.jsonl", "rows": rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "options": {key: getattr(cfg, key) for key in FILE_OPTIONS[name]}}


def read_manifest(root: str) -> dict:
    try:
        with open(os.path.join(root, "manifest.json")) as f:
            manifest = json.load(f)
        return manifest if isinstance(manifest, dict) else {}
    except (OSError, ValueError):
        return {}


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def is_current(root: str, name: str, cfg: EmbeddedConfig, manifest: dict) -> bool:
    """The file exists, and the manifest says it was built by this version, Python and options, at its size."""
    files = manifest.get("files")
    entry = files.get(name) if isinstance(files, dict) else None
    path = os.path.join(root, f"{name}.jsonl")
    return (manifest.get("version") == EMBEDDED_VERSION and manifest.get("python") == python_version()
            and isinstance(entry, dict) and os.path.isfile(path) and os.path.getsize(path) == entry.get("bytes")
            and entry.get("options") == {key: getattr(cfg, key) for key in FILE_OPTIONS[name]})


def ensure_embedded_data(root: str = "data/embedded", cfg: EmbeddedConfig | None = None, force: bool = False,
                         verbose: bool = False) -> dict[str, str]:
    """Build the files of `root` that are missing or stale (all of them with force); return {name: path}.

    Safe to call from several processes at once: each file is written atomically, and they write the same bytes.
    """
    from minitrain.dataset.files import write_atomic    # not at the top: see the imports' comment
    cfg = cfg or EmbeddedConfig()
    os.makedirs(root, exist_ok=True)
    manifest = read_manifest(root)
    current = {name: manifest["files"][name] for name in FILES if not force and is_current(root, name, cfg, manifest)}
    docs_cache: list[DocEntry] = []
    for name in FILES:
        if name in current:
            continue
        rows = build_rows(name, cfg, docs_cache)
        data = jsonl_bytes(rows)
        write_atomic(os.path.join(root, f"{name}.jsonl"), data)
        current[name] = file_entry(name, cfg, data, len(rows))
        if verbose:
            print(f"wrote {os.path.join(root, name + '.jsonl')}: {len(rows)} rows, {len(data) / 1e6:.2f} MB")
    new_manifest = {"version": EMBEDDED_VERSION, "python": python_version(),
                    "files": {name: current[name] for name in FILES}}
    if new_manifest != manifest:
        write_atomic(os.path.join(root, "manifest.json"), (json.dumps(new_manifest, indent=2) + "\n").encode())
    return {name: os.path.join(root, f"{name}.jsonl") for name in FILES}


def main(argv: list[str] | None = None) -> None:
    if argv is None and sys.argv[1:] == ["--print-documentation"]:    # the child process of documentation()
        json.dump([vars(entry) for entry in read_documentation()], sys.stdout)
        return
    parser = argparse.ArgumentParser(description="Build the embedded training data (no download).")
    parser.add_argument("--out", default="data/embedded", help="output directory (default data/embedded)")
    parser.add_argument("--force", action="store_true", help="rebuild every file, even those that are current")
    for f in fields(EmbeddedConfig):
        parser.add_argument(f"--{f.name}", type=int, default=f.default, help=f.metadata["help"])
    args = parser.parse_args(argv)
    try:
        cfg = EmbeddedConfig(**{f.name: getattr(args, f.name) for f in fields(EmbeddedConfig)})
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    paths = ensure_embedded_data(args.out, cfg, force=args.force)
    manifest = read_manifest(args.out)
    for name, path in paths.items():
        entry = manifest["files"][name]
        print(f"{path}: {entry['rows']} rows, {entry['bytes'] / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

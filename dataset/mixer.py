"""The dataset mixer: named sources with weights -> deterministic train and validation JSONL files.

A mixture is a YAML file in config/data/<phase>/ (phase = pretrain, midtrain, sft, dpo, rlaif):

    phase: sft                      # must match the trainer that reads it
    seed: 0                         # sampling seed of the mixture (default: the run's --seed)
    validation_fraction: 0.02       # of each source's rows, held out before any sampling
    num_samples: 20000              # training rows in all (default: the rows the sources hold together)
    max_bad_fraction: 0.0           # malformed rows tolerated per source (skipped and counted); above it, an error
    sources:
      - name: chat                  # unique; shown in the summary
        path: data/my_chat.jsonl    # JSON or JSONL, relative to the current directory
        weight: 3                   # share of the training rows: weight / sum of weights
        max_samples: 5000           # use at most this many rows of the source (a seeded random subset)
        where: {task: arithmetic}   # keep only rows whose field equals the value (or one of a list of values);
                                    # a dotted name reads a nested field: where: {meta.level: [2, 3]}
      - name: tasks
        embedded: sft               # or one of the repo's embedded files (built on first use, no download)
        weight: 1

How rows are drawn. Each source's rows are checked against the phase's format (dataset/formats.py) and rewritten
to its canonical shape, shuffled with a seed of their own, and split: the first validation_fraction go to the
validation file, the rest form the source's pool. Source i then contributes round(N * w_i / sum(w)) training rows,
N = num_samples: a random subset of its pool when the pool is larger, every row k times plus a random subset of the
remainder when it is smaller (upsampling). The training rows of all sources are shuffled together. So the realised
shares equal the weights up to rounding, and the same mixture, seed and files give the same bytes.

Validation happens before any work: the YAML's keys and types, weights > 0, files that exist and a sample of each
source's first rows; errors name the file, line and field. Preparation writes PREPARED_DIR/<phase>-<name>/
{train.jsonl, val.jsonl, manifest.json} atomically; `--use_prepared` reads them back without touching the sources.
"""

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field

import yaml

from minitrain.dataset.files import write_atomic, yaml_error
from minitrain.dataset.formats import PHASE_FORMATS, PHASES, row_texts
from minitrain.dataset.jsonl import DataError, check_file, iter_rows
from minitrain import REPO_ROOT

DEFAULT_MIXTURES = os.path.join(REPO_ROOT, "config", "data")
EMBEDDED_DIR = os.path.join("data", "embedded")
SAMPLE_ROWS = 200            # rows of each source checked before any work
MAX_LISTED = 3               # bad rows named in an error message
PREPARED_VERSION = 1


@dataclass
class Source:
    name: str
    path: str                  # the file (for embedded sources, where it is built)
    weight: float
    max_samples: int | None = None
    embedded: str | None = None
    where: dict | None = None  # {field (dotted for nested): [allowed values]}: rows kept before any sampling


@dataclass
class Mixture:
    phase: str
    name: str                  # names the prepared directory: the YAML file's (or data file's) stem
    sources: list[Source]
    seed: int
    validation_fraction: float = 0.02
    num_samples: int | None = None
    max_bad_fraction: float = 0.0
    origin: str = ""           # the YAML file, or the --data_path file

    def fingerprint(self) -> dict:
        """What the prepared files depend on besides the sources' bytes (compared by --use_prepared)."""
        return {"phase": self.phase, "seed": self.seed, "validation_fraction": self.validation_fraction,
                "num_samples": self.num_samples, "max_bad_fraction": self.max_bad_fraction,
                "sources": [{"name": s.name, "path": os.path.abspath(s.path), "weight": s.weight,
                             "max_samples": s.max_samples, "where": s.where} for s in self.sources]}


@dataclass
class PreparedData:
    phase: str
    directory: str
    train_file: str
    val_file: str | None       # None when the mixture holds out nothing
    summary: dict = field(default_factory=dict)


# =============================================================================================================
# Reading and checking a mixture file
# =============================================================================================================

MIXTURE_KEYS = {"phase": str, "seed": int, "validation_fraction": (int, float), "num_samples": int,
                "max_bad_fraction": (int, float), "sources": list}
SOURCE_KEYS = {"name": str, "path": str, "embedded": str, "weight": (int, float), "max_samples": int,
               "where": dict}
SCALARS = (str, int, float, bool)       # the values a `where` condition compares with


def key_lines(node) -> dict[str, int]:
    """1-based line of each key of a YAML mapping node."""
    return {k.value: k.start_mark.line + 1 for k, _ in node.value} if isinstance(node, yaml.MappingNode) else {}


def type_name(tp) -> str:
    return "number" if tp == (int, float) else tp.__name__


def check_type(value, tp, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, tp):
        raise DataError(f"{where} must be {type_name(tp)}, got {value!r}")


def load_mixture(path: str, phase: str, seed: int) -> Mixture:
    """Read and check a mixture YAML for `phase`; every problem is a DataError naming the file, line and key."""
    if phase not in PHASES:
        raise DataError(f"unknown phase {phase!r} (expected one of {', '.join(PHASES)})")
    if not os.path.isfile(path):
        raise DataError(f"{path}: data config not found")
    with open(path) as f:
        text = f.read()
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        raise DataError(f"{path}: {yaml_error(e)}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: must hold a mapping with 'phase' and 'sources'")
    lines = key_lines(node)
    at = lambda key: f"{path}: line {lines.get(key, '?')}: key '{key}'"
    for key, value in data.items():
        if key not in MIXTURE_KEYS:
            raise DataError(f"{at(key)} is unknown (expected {', '.join(MIXTURE_KEYS)})")
        check_type(value, MIXTURE_KEYS[key], at(key))
    for key in ("phase", "sources"):
        if key not in data:
            raise DataError(f"{path}: key '{key}' is missing")
    if data["phase"] not in PHASES:
        raise DataError(f"{at('phase')}: unknown phase {data['phase']!r} (expected one of {', '.join(PHASES)})")
    if data["phase"] != phase:
        raise DataError(f"{at('phase')}: this mixture is for phase {data['phase']!r}, but this trainer reads "
                        f"phase {phase!r}")
    fraction = float(data.get("validation_fraction", 0.02))
    if not 0 <= fraction < 1:
        raise DataError(f"{at('validation_fraction')} must be in [0, 1), got {fraction}")
    bad_fraction = float(data.get("max_bad_fraction", 0.0))
    if not 0 <= bad_fraction < 1:
        raise DataError(f"{at('max_bad_fraction')} must be in [0, 1), got {bad_fraction}")
    if data.get("num_samples") is not None and data["num_samples"] < 1:
        raise DataError(f"{at('num_samples')} must be at least 1, got {data['num_samples']}")
    if not data["sources"]:
        raise DataError(f"{at('sources')} is empty: a mixture needs at least one source")

    source_nodes = dict((k.value, v) for k, v in node.value)["sources"].value
    sources, names = [], set()
    for i, (entry, entry_node) in enumerate(zip(data["sources"], source_nodes)):
        entry_line = entry_node.start_mark.line + 1
        where = f"{path}: line {entry_line}: sources[{i}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where} must be a mapping with 'name', 'path' (or 'embedded') and 'weight'")
        entry_lines = key_lines(entry_node)
        at_source = lambda key: f"{path}: line {entry_lines.get(key, entry_line)}: sources[{i}] key '{key}'"
        for key, value in entry.items():
            if key not in SOURCE_KEYS:
                raise DataError(f"{at_source(key)} is unknown (expected {', '.join(SOURCE_KEYS)})")
            check_type(value, SOURCE_KEYS[key], at_source(key))
        for key in ("name", "weight"):
            if key not in entry:
                raise DataError(f"{where}: key '{key}' is missing")
        if ("path" in entry) == ("embedded" in entry):
            raise DataError(f"{where}: give exactly one of 'path' and 'embedded'")
        if entry["name"] in names:
            raise DataError(f"{at_source('name')}: the name {entry['name']!r} is used twice")
        names.add(entry["name"])
        weight = float(entry["weight"])
        if not (weight > 0 and math.isfinite(weight)):
            raise DataError(f"{at_source('weight')} must be a positive number, got {entry['weight']!r}")
        if entry.get("max_samples") is not None and entry["max_samples"] < 1:
            raise DataError(f"{at_source('max_samples')} must be at least 1, got {entry['max_samples']}")
        where_rule = check_where(entry.get("where"), at_source("where"))
        embedded = entry.get("embedded")
        if embedded is not None:
            from minitrain.dataset.embedded import FILES
            if embedded not in FILES:
                raise DataError(f"{at_source('embedded')}: unknown embedded file {embedded!r} "
                                f"(expected one of {', '.join(FILES)})")
            source_path = os.path.join(EMBEDDED_DIR, f"{embedded}.jsonl")
        else:
            source_path = entry["path"]
            if not os.path.isfile(source_path):
                raise DataError(f"{at_source('path')}: file {source_path} not found")
        sources.append(Source(entry["name"], source_path, weight, entry.get("max_samples"), embedded, where_rule))
    return Mixture(phase=phase, name=os.path.splitext(os.path.basename(path))[0], sources=sources,
                   seed=data.get("seed", seed), validation_fraction=fraction, num_samples=data.get("num_samples"),
                   max_bad_fraction=bad_fraction, origin=path)


def check_where(where: dict | None, at: str) -> dict | None:
    """A source's `where` as {field: [values]} (a single value becomes a list of one); DataError naming `at`."""
    if where is None:
        return None
    if not where:
        raise DataError(f"{at} is empty: give at least one field, e.g. where: {{task: arithmetic}}")
    rule = {}
    for name, allowed in where.items():
        values = allowed if isinstance(allowed, list) else [allowed]
        if not isinstance(name, str) or not name or not values or \
                not all(isinstance(v, SCALARS) for v in values):
            raise DataError(f"{at}: {name!r}: {allowed!r} must map a field name to a value or a list of values "
                            f"(strings, numbers, booleans)")
        rule[name] = values
    return rule


def field_value(row: dict, name: str):
    """row["meta"]["level"] for name "meta.level"; a missing field reads as MISSING."""
    value = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


MISSING = object()


def select_rows(rows: list[dict], where: dict | None) -> list[dict]:
    """The rows whose every `where` field holds one of its allowed values (all rows when where is None). Values
    compare as Python values: YAML's 2 matches a row's 2, not "2"; True never matches 1."""
    if where is None:
        return rows

    def kind(x):   # ints and floats compare as numbers; a bool or a string only with its own type
        return float if type(x) is int else type(x)

    def allowed(value, values) -> bool:
        return value is not MISSING and any(kind(value) is kind(v) and value == v for v in values)
    return [row for row in rows if all(allowed(field_value(row, name), values) for name, values in where.items())]


def single_file_mixture(path: str, phase: str, seed: int) -> Mixture:
    """--data_path FILE: a mixture of one source."""
    if phase not in PHASES:
        raise DataError(f"unknown phase {phase!r} (expected one of {', '.join(PHASES)})")
    check_file(path)
    name = os.path.splitext(os.path.basename(path))[0]
    return Mixture(phase=phase, name=name, sources=[Source(name, path, 1.0)], seed=seed, origin=path)


def resolve_mixture(phase: str, data_config: str | None, data_path: str | None, seed: int) -> Mixture:
    """The mixture a run asked for: --data_path, --data_config, or config/data/<phase>/default.yaml."""
    if data_path:
        return single_file_mixture(data_path, phase, seed)
    return load_mixture(data_config or os.path.join(DEFAULT_MIXTURES, phase, "default.yaml"), phase, seed)


# =============================================================================================================
# Reading the sources
# =============================================================================================================

@dataclass
class SourceRows:
    rows: list[dict]           # canonical rows, in file order
    bad: int                   # malformed rows skipped
    bad_examples: list[str]    # "line 7: field 'messages' ..." for the first few


def read_source(source: Source, phase: str, max_bad_fraction: float, limit: int | None = None) -> SourceRows:
    """The canonical rows of a source (the first `limit` rows only, when given); malformed rows are counted, and
    past max_bad_fraction of the rows read they are an error naming the first of them by file and line."""
    normalize = PHASE_FORMATS[phase]
    rows, bad, examples, seen = [], 0, [], 0
    for row in iter_rows(source.path):
        seen += 1
        canonical, problem = (None, row.problem) if row.data is None else normalize(row.data)
        if canonical is None:
            bad += 1
            if len(examples) < MAX_LISTED:
                examples.append(f"line {row.line}: {problem}")
        else:
            rows.append(canonical)
        if limit is not None and seen >= limit:
            break
    if seen == 0:
        raise DataError(f"{source.path}: no rows")
    if bad and bad > max_bad_fraction * seen:
        shown = "; ".join(examples)
        raise DataError(f"{source.path}: {bad} of {seen} rows {'checked ' if limit else ''}are malformed for phase "
                        f"{phase} (max_bad_fraction {max_bad_fraction:g}): {shown}")
    if not rows:
        raise DataError(f"{source.path}: no usable rows for phase {phase}")
    return SourceRows(rows, bad, examples)


def shares(weights: list[float], total: int) -> list[int]:
    """Integer row counts proportional to `weights` summing to `total` (largest remainders round up)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[:total - sum(counts)]:
        counts[i] += 1
    return counts


def count_tokens(phase: str, rows: list[dict], tokenizer) -> list[int]:
    if tokenizer is None:
        return [0] * len(rows)
    texts = [row_texts(phase, row) for row in rows]
    owner = [r for r, group in enumerate(texts) for _ in group]       # the row of each text
    counts = [0] * len(rows)
    for i, ids, _ in tokenizer.encode_pieces([t for group in texts for t in group]):   # bounded memory per piece
        counts[owner[i]] += len(ids)
    return counts


# =============================================================================================================
# Preparing and reading back
# =============================================================================================================

def prepared_directory(prepared_dir: str, mixture: Mixture) -> str:
    return os.path.join(prepared_dir, f"{mixture.phase}-{mixture.name}")




def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def check_mixture(mixture: Mixture) -> None:
    """Before any work: build missing embedded files, then check the first rows of every source."""
    if any(s.embedded for s in mixture.sources):
        from minitrain.dataset.embedded import ensure_embedded_data
        ensure_embedded_data(EMBEDDED_DIR)
    for source in mixture.sources:
        read_source(source, mixture.phase, mixture.max_bad_fraction, limit=SAMPLE_ROWS)


def prepare_mixture(mixture: Mixture, prepared_dir: str, tokenizer=None) -> PreparedData:
    """Check, sample and write the mixture's train/validation files and manifest (call on one rank only)."""
    check_mixture(mixture)
    train, val, per_source = [], [], []
    read = [read_source(s, mixture.phase, mixture.max_bad_fraction) for s in mixture.sources]
    pools, selected = [], []      # selected: rows each source's `where` keeps
    for source, got in zip(mixture.sources, read):
        rng = random.Random(f"{mixture.seed}/{source.name}")
        rows = select_rows(got.rows, source.where)
        if not rows:
            raise DataError(f"{mixture.origin}: source {source.name!r}: where {source.where} keeps none of the "
                            f"{len(got.rows)} rows of {source.path}")
        selected.append(len(rows))
        rng.shuffle(rows)
        if source.max_samples is not None:
            rows = rows[:source.max_samples]
        n_val = round(len(rows) * mixture.validation_fraction)
        if mixture.validation_fraction > 0 and len(rows) >= 2:
            n_val = max(1, n_val)
        if len(rows) - n_val < 1:
            raise DataError(f"{source.path}: {len(rows)} usable rows leave none for training after holding out "
                            f"validation_fraction {mixture.validation_fraction:g}")
        val += [{**r, "source": source.name} for r in rows[:n_val]]
        pools.append((rows[n_val:], n_val, rng))
    total = mixture.num_samples or sum(len(pool) for pool, _, _ in pools)
    counts = shares([s.weight for s in mixture.sources], total)
    for source, got, (pool, n_val, rng), count, kept in zip(mixture.sources, read, pools, counts, selected):
        tokens = count_tokens(mixture.phase, pool, tokenizer)
        repeats, remainder = divmod(count, len(pool))
        chosen = list(range(len(pool))) * repeats + rng.sample(range(len(pool)), remainder)
        train += [{**pool[i], "source": source.name} for i in chosen]
        per_source.append({"name": source.name, "path": source.path, "weight": source.weight,
                           "target_share": source.weight / sum(s.weight for s in mixture.sources),
                           "rows_available": len(got.rows), "rows_skipped": got.bad,
                           "rows_selected": kept, "train_rows": count,
                           "val_rows": n_val, "epochs_of_source": count / len(pool),
                           "train_tokens": sum(tokens[i] for i in chosen)})
    random.Random(f"{mixture.seed}/train").shuffle(train)
    random.Random(f"{mixture.seed}/val").shuffle(val)
    for entry in per_source:
        entry["realised_share"] = entry["train_rows"] / len(train)

    directory = prepared_directory(prepared_dir, mixture)
    os.makedirs(directory, exist_ok=True)
    train_file = os.path.join(directory, "train.jsonl")
    val_file = os.path.join(directory, "val.jsonl") if val else None
    train_bytes = jsonl_bytes(train)
    write_atomic(train_file, train_bytes)
    if val_file:
        write_atomic(val_file, jsonl_bytes(val))
    elif os.path.exists(os.path.join(directory, "val.jsonl")):
        os.remove(os.path.join(directory, "val.jsonl"))
    summary = {"phase": mixture.phase, "mixture": mixture.origin, "train_rows": len(train), "val_rows": len(val),
               "train_tokens": sum(e["train_tokens"] for e in per_source) if tokenizer is not None else None,
               "sources": per_source}
    manifest = {"version": PREPARED_VERSION, "fingerprint": mixture.fingerprint(), "summary": summary,
                "train_sha256": hashlib.sha256(train_bytes).hexdigest()}
    write_atomic(os.path.join(directory, "manifest.json"), (json.dumps(manifest, indent=1) + "\n").encode())
    return PreparedData(mixture.phase, directory, train_file, val_file, summary)


def load_prepared(mixture: Mixture, prepared_dir: str) -> PreparedData:
    """The files an earlier preparation of this mixture wrote (--use_prepared), checked against the mixture."""
    directory = prepared_directory(prepared_dir, mixture)
    manifest_path = os.path.join(directory, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise DataError(f"--use_prepared: {manifest_path} not found (run once without --use_prepared to prepare "
                        f"the {mixture.phase} data)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        summary, fingerprint = manifest["summary"], manifest["fingerprint"]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{manifest_path}: not a valid manifest (prepare the data again without --use_prepared)") \
            from None
    if fingerprint != mixture.fingerprint():
        raise DataError(f"--use_prepared: {directory} was prepared from another mixture or seed than "
                        f"{mixture.origin} asks for; prepare it again without --use_prepared")
    train_file = os.path.join(directory, "train.jsonl")
    if not os.path.isfile(train_file):
        raise DataError(f"--use_prepared: {train_file} not found")
    val_file = os.path.join(directory, "val.jsonl") if summary["val_rows"] else None
    return PreparedData(mixture.phase, directory, train_file, val_file, summary)


def format_summary(summary: dict) -> str:
    """The realised mixture as a small table (printed by the trainers)."""
    lines = [f"data ({summary['phase']}, {summary['mixture']}): {summary['train_rows']:,} training rows"
             + (f", {summary['train_tokens']:,} tokens" if summary.get("train_tokens") is not None else "")
             + f", {summary['val_rows']:,} validation rows"]
    for s in summary["sources"]:
        skipped = f", {s['rows_skipped']} malformed rows skipped" if s["rows_skipped"] else ""
        if s.get("rows_selected", s["rows_available"]) < s["rows_available"]:
            skipped += f", {s['rows_selected']:,} of {s['rows_available']:,} rows selected by where"
        lines.append(f"  {s['name']:<16} weight {s['weight']:g} -> {s['realised_share']:.1%} of rows "
                     f"({s['train_rows']:,} rows, {s['train_tokens']:,} tokens, {s['epochs_of_source']:.2f}x "
                     f"the source{skipped}), {s['val_rows']:,} held out")
    return "\n".join(lines)

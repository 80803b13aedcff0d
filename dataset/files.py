"""Files written whole or not at all, content hashes, and YAML errors told in one line: the file helpers every
folder uses."""

import hashlib
import os
import tempfile


def write_atomic(path: str, data: bytes | str) -> None:
    """Write `data` to a temporary file in the same directory, flush it to disk, then rename it over `path`:
    a reader (or a run killed mid-write) sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)          # mkstemp creates files only the owner can read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, as hex (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def yaml_error(e) -> str:
    """A yaml.YAMLError as `line N: not valid YAML (<problem>)`, for one-line errors that name the file first."""
    mark = getattr(e, "problem_mark", None)
    line = f"line {mark.line + 1}: " if mark is not None else ""
    return f"{line}not valid YAML ({getattr(e, 'problem', None) or e})"

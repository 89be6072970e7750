"""Which line of a data file is bad, in the user's words: 1-based line numbers and a plain cause.

pyarrow reports a broken JSON-lines file by "row" (0-based, blank lines not counted) with its own
wording ("Invalid encoding in string"); an editor shows lines. ``bad_line`` reads the file itself,
line by line, and says e.g. ``line 4: not UTF-8 text (byte 0xff at column 10)``. It is cheap on the
first lines (``limit``), which the pre-flight check reads before any process group starts, and is
run over the whole file only after a full read has already failed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

PARQUET_MAGIC = b"PAR1"


def _utf8_problem(raw: bytes) -> Optional[str]:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8"
    return None


def _json_problem(text: str, text_field: str) -> Optional[str]:
    try:
        row = json.loads(text.strip())
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object; each line must be one object like {{\"{text_field}\": ...}}"
    value = row.get(text_field)
    if value is not None and not isinstance(value, str):
        return (f"field {text_field!r} is a JSON {type(value).__name__}, not text; "
                f"set data.text_field to a field of strings")
    return None


def _is_json_lines(path: Path) -> bool:
    """.jsonl always; .json when it is not one JSON document (an array or a single object spanning lines)."""
    if path.suffix.lower() == ".jsonl":
        return True
    with open(path, "rb") as f:
        head = f.read(1 << 16).lstrip()
    if head.startswith(b"["):
        return False
    first = head.split(b"\n", 1)[0]
    try:
        json.loads(first)
        return True
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def first_bad_file_line(paths: list[str], text_field: str = "text") -> Optional[str]:
    """'data file X: line N: cause' for the first bad line of any of ``paths``, or None."""
    for path in paths:
        found = bad_line(path, text_field)
        if found:
            return f"data file {path}: {found}"
    return None


def bad_line(path: str, text_field: str = "text", limit: Optional[int] = None) -> Optional[str]:
    """'line N: cause' for the first bad line of a .txt/.json/.jsonl file (only the first ``limit`` lines
    when given), 'not a parquet file ...' for a parquet file without its magic bytes, or None."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext == ".parquet":
        with open(p, "rb") as f:
            head = f.read(4)
        return None if head == PARQUET_MAGIC else f"not a parquet file (it starts with {head!r}, not {PARQUET_MAGIC!r})"
    as_json = ext in (".json", ".jsonl") and _is_json_lines(p)
    with open(p, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if limit is not None and number > limit:
                break
            problem = _utf8_problem(raw)
            if problem is None and as_json and raw.strip():
                problem = _json_problem(raw.decode("utf-8"), text_field)
            if problem:
                return f"line {number}: {problem}"
    return None

"""Reading, checking, rendering and splitting the SFT and eval data (the `preprocess` stage's core).

Sources are declared per stage in params (`data.stage1.sources`, ...). Each is read into rows of its
task's schema, normalised, scanned for Korean PII, de-duplicated, kept apart from the eval sets,
split by a hash of its question, rendered into a prompt/completion pair and measured in tokens.
Every bad input stops the stage with a StageError of one sentence naming the file, row and column.

The training format itself (`render_prompt`, `render_completion`, the chat template) lives in
kmed/prompt.py, which evaluate, export and serve import too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmed.config import DataCfg, Params, SourceCfg, StageDataCfg
from kmed.io import StageError, write_jsonl
from kmed.prompt import THINK_CLOSE, Prompter, render_completion, render_prompt  # noqa: F401  (render_prompt: re-exported)

log = logging.getLogger(__name__)

KO2EN_INSTRUCTION = "다음 한국어 문장을 영어로 번역하세요."
EN2KO_INSTRUCTION = "Translate the following English sentence into Korean."

# Schema field -> required? per task. `input` of instructions and option E of 4-option MCQs may be empty.
SCHEMAS: dict[str, dict[str, bool]] = {
    "reasoning": {"question": True, "cot": True, "answer": True},
    "instruction": {"instruction": True, "input": False, "output": True},
    "translation": {"ko": True, "en": True},
    "mcq": {
        "question": True,
        "A": True,
        "B": True,
        "C": True,
        "D": True,
        "E": False,
        "answer": True,
        "id": False,
        "subject": False,
    },
    "pairs": {"ko": True, "en": True},
}
# Optional fields read only when `fields` maps them (others fall back to a column of their own name):
# an MCQ id takes part in dedup, so a stray "id" column must not change it unasked.
MAPPED_ONLY = ("id", "subject")
TRAIN_TASKS = ("reasoning", "instruction", "translation")
MCQ_LETTERS = ("A", "B", "C", "D", "E")
FOLDER_GLOBS = {
    "jsonl": "*.jsonl",
    "json": "*.json",
    "csv": "*.csv",
    "xlsx": "*.xlsx",
    "parquet": "*.parquet",
}
# Above this ratio of uncompressed to compressed size an .xlsx is treated as a zip bomb.
MAX_XLSX_RATIO = 100.0
PROGRESS_MIN_ROWS = 20_000
TOKENIZE_BATCH = 2048


# --------------------------------------------------------------------------- text helpers

_HSPACE = re.compile(r"[^\S\n]+")
_SPACE_BEFORE_NL = re.compile(r" +\n")
_ALL_SPACE = re.compile(r"\s+")
_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")


def normalize_text(s: str) -> str:
    """NFC, unified newlines, runs of spaces/tabs collapsed to one space, newlines kept, stripped."""
    s = unicodedata.normalize("NFC", s)
    if "\r" in s:
        s = s.replace("\r\n", "\n").replace("\r", "\n")
    s = _HSPACE.sub(" ", s)
    if " \n" in s:
        s = _SPACE_BEFORE_NL.sub("\n", s)
    return s.strip()


def match_key(s: str) -> str:
    """Comparison key for overlap and split: normalised, case-folded, all whitespace as one space."""
    return _ALL_SPACE.sub(" ", unicodedata.normalize("NFC", s)).strip().casefold()


def detect_lang(text: str) -> str:
    """'ko' when the text holds any Hangul, else 'en'."""
    return "ko" if _HANGUL.search(text) else "en"


_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")


def main_script(text: str) -> str | None:
    """'ko' when the text holds more Hangul than Latin letters, 'en' when more Latin, None when neither
    (numbers, IDs, punctuation)."""
    ko, en = len(_HANGUL.findall(text)), len(_LATIN.findall(text))
    return "ko" if ko > en else "en" if en > ko else None


def short_hash(*parts: str, n: int = 16) -> str:
    return hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()[:n]


def _unit_hash(*parts: str) -> float:
    """A deterministic number in [0, 1) from the parts."""
    return int(hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()[:15], 16) / 16**15


def _q(names: Iterable[Any]) -> str:
    return ", ".join(repr(str(n)) for n in names)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _either(options: list[str]) -> str:
    """'a', 'a or b', 'a, b, or c'."""
    if len(options) < 3:
        return " or ".join(options)
    return ", ".join(options[:-1]) + ", or " + options[-1]


def percent(n: float, d: float) -> str:
    """n / d as a percentage with one decimal ('0.0%' when d is 0): the one rounding that errors, logs
    and the data report share, always from the counts (a share rounded twice can read 84.9% vs 84.8%)."""
    return f"{n / d if d else 0.0:.1%}"


# --------------------------------------------------------------------------- PII

# Resident registration number YYMMDD-GNNNNNN (G = 1..8, hyphen optional); checksums are not relied
# on (numbers issued since 2020 do not satisfy them). Phones: mobile 01X and landlines 02 / 0XX / 070.
# Each pattern starts with a plain digit (then looks back: no digit, '.' or ',' before it) so the
# regex engine can skip ahead to digits; a leading lookbehind made the scan 3x slower.
_RRN = re.compile(r"\d(?<![\d.,]\d)\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])-?[1-8]\d{6}(?!\d)")
_SEP = r"(?:\) ?|[-. ])?"
_PHONE = re.compile(
    r"0(?<![\d.,]0)(?:1[016789]|2|3[1-3]|4[1-4]|5[1-5]|6[1-4]|70)" + _SEP + r"\d{3,4}[-. ]?\d{4}(?!\d)"
)
PII_KINDS = {"rrn": "Korean resident registration number", "phone": "Korean phone number"}
_DIGIT = re.compile(r"\d")


def find_pii(text: str) -> str | None:
    """The kind of the first PII found ('rrn' or 'phone'), or None."""
    if _RRN.search(text):
        return "rrn"
    if _PHONE.search(text):
        return "phone"
    return None


def mask_pii(text: str) -> tuple[str, Counter[str]]:
    """Replace every digit of each RRN and phone number with '*'; return the text and counts by kind."""
    counts: Counter[str] = Counter()
    for kind, rx in (("rrn", _RRN), ("phone", _PHONE)):

        def sub(m: re.Match[str], kind: str = kind) -> str:
            counts[kind] += 1
            return _DIGIT.sub("*", m.group(0))

        text = rx.sub(sub, text)
    return text, counts


# --------------------------------------------------------------------------- paths


def resolve_source_files(src: SourceCfg, root: Path) -> list[Path]:
    """The files a file-based source names (a file, a glob, or a folder), refused if outside `root`."""
    assert src.path is not None
    root = root.resolve()
    raw = src.path
    p = Path(raw)
    if ".." in p.parts or (p.is_absolute() and not _inside(p.resolve(), root)):
        raise StageError(
            f"source {src.name!r}: path {raw!r} escapes the repository root {root}; refusing it."
        )
    rel = p.relative_to(root) if p.is_absolute() and _inside(p, root) else p
    if any(ch in raw for ch in "*?["):
        files = sorted(f for f in root.glob(str(rel)) if f.is_file())
        if not files:
            raise StageError(f"source {src.name!r}: the glob {raw!r} matches no files.")
    else:
        full = root / rel
        if not _inside(full.resolve(), root):
            raise StageError(
                f"source {src.name!r}: {raw!r} resolves outside the repository root (to {full.resolve()}); refusing it."
            )
        if full.is_dir():
            files = sorted(
                f for f in full.glob(FOLDER_GLOBS[src.kind]) if f.is_file() and not f.name.startswith("~$")
            )
            if not files:
                raise StageError(
                    f"source {src.name!r}: folder {raw!r} holds no {FOLDER_GLOBS[src.kind]} files."
                )
        elif full.exists():
            files = [full]
        else:
            raise StageError(f"source {src.name!r}: {raw!r} does not exist.")
    for f in files:
        if not _inside(f.resolve(), root):
            raise StageError(
                f"source {src.name!r}: {display(f, root)} resolves outside the repository root "
                f"(to {f.resolve()}); refusing it."
            )
    return files


def _inside(p: Path, root: Path) -> bool:
    return p == root or p.is_relative_to(root)


def display(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root.resolve()).as_posix() if p.is_absolute() else p.as_posix()
    except ValueError:
        return str(p)


# --------------------------------------------------------------------------- decoding


_BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32-le", "UTF-32"),
    (b"\x00\x00\xfe\xff", "utf-32-be", "UTF-32"),
    (b"\xff\xfe", "utf-16-le", "UTF-16"),
    (b"\xfe\xff", "utf-16-be", "UTF-16"),
)


def decode_bytes(data: bytes, label: str) -> str:
    """UTF-8 (with or without BOM), UTF-16/32 by their BOM, else CP949/EUC-KR; never drops a byte silently."""
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            try:
                text = data[len(bom) :].decode(codec)
            except UnicodeDecodeError as e:
                raise StageError(
                    f"{label}: cannot decode the text as {name} (its byte-order mark says {name}; bad bytes at "
                    f"byte offset {e.start + len(bom)})."
                ) from None
            log.info("%s: decoded as %s (byte-order mark)", label, name)
            return text
    head_bytes = data[:4096]
    if head_bytes.count(0) * 4 > len(head_bytes):  # ASCII text in UTF-16: every other byte is 0x00
        raise StageError(
            f"{label}: cannot decode the text as UTF-8 or CP949: its bytes look like UTF-16 without a byte-order "
            "mark (every other byte is 0x00); save it as UTF-8 or as UTF-16 with a BOM."
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        utf8_err = e
    # A file that was valid UTF-8 Korean up to the bad byte is corrupt UTF-8, not CP949.
    head = data[: utf8_err.start].decode("utf-8", errors="strict") if utf8_err.start else ""
    if not _HANGUL.search(head):
        try:
            text = data.decode("cp949")
            log.info("%s: decoded as CP949", label)
            return text
        except UnicodeDecodeError:
            pass
    raise StageError(
        f"{label}: cannot decode the text as UTF-8 or CP949 (first bad byte 0x{data[utf8_err.start]:02x} at "
        f"byte offset {utf8_err.start})."
    )


def _read_text(path: Path, label: str) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise StageError(f"{label}: the file is empty.")
    return decode_bytes(data, label)


def _cell_text(v: Any) -> str | None:
    """A cell as text ('' for missing); None when the cell holds something that is not text-like."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return str(int(v)) if v.is_integer() else repr(v)
    if hasattr(v, "isoformat"):
        return v.isoformat()
    try:  # numpy scalars
        return _cell_text(v.item())
    except AttributeError:
        return None


# --------------------------------------------------------------------------- reading


@dataclass(slots=True)
class Row:
    """One source row in its task's schema; `where unit n` locates it for error messages."""

    source: str
    task: str
    where: str
    unit: str
    n: int
    cols: dict[str, str]  # schema field -> source column
    raw: tuple[str, ...]
    values: dict[str, str] = field(default_factory=dict)
    file: str = ""  # the file's display name (the Hub split's label for hf sources)

    def loc(self) -> str:
        return f"{self.where} {self.unit} {self.n}"


@dataclass
class _Raw:
    where: str
    unit: str
    n: int
    get: Any  # column -> value
    cell: Any = None  # column -> spreadsheet cell name, for xlsx
    file: str = ""


def _norm_header(h: Any) -> str:
    return unicodedata.normalize("NFC", "" if h is None else str(h)).strip()


class FieldMap(dict[str, str]):
    """Schema field -> source column, remembering the fields that `fields` left unmapped (they read the
    column of their own name)."""

    def __init__(self, cols: dict[str, str], defaulted: Iterable[str] = ()) -> None:
        super().__init__(cols)
        self.defaulted = frozenset(defaulted)


def _missing_columns(
    label: str,
    wanted: dict[str, str],
    required: dict[str, bool],
    found: Sequence[str],
    sheets_hint: str = "",
) -> None:
    defaulted = wanted.defaulted if isinstance(wanted, FieldMap) else frozenset()
    for f in defaulted:
        # medical-o1 holds both `question` (the source MCQ stem) and `Question` (what the CoT answers):
        # the default name must not pick one of them unasked.
        col = wanted[f]
        variants = [c for c in found if c != col and c.casefold() == col.casefold()]
        if variants:
            has = "also has" if col in found else "lacks it but has"
            raise StageError(
                f"{label}: fields does not map {f!r}, so it would read the column {col!r}, but the file {has} "
                f"{_q(variants)}; map it explicitly (fields: {{{f}: {variants[0]}}} or {{{f}: {col}}})."
            )
    missing = [col for f, col in wanted.items() if required[f] and isinstance(col, str) and col not in found]
    if missing:
        word = "column" if len(missing) == 1 else "columns"
        raise StageError(
            f"{label}: missing {word} {_q(missing)} (found: {_q(found) or 'none'}){sheets_hint}."
        )


def _column_label(j: int, letters: bool) -> str:
    """A 0-based column index as a spreadsheet (B) or a CSV (2) names it."""
    if letters:
        from openpyxl.utils import get_column_letter

        return get_column_letter(j + 1)
    return str(j + 1)


def _header_columns(
    where: str,
    header: list[str],
    wanted: dict[str, str | int],
    required: dict[str, bool],
    letters: bool,
    hint: str = "",
) -> dict[str | int, int]:
    """Source column (a name, or a 1-based number) -> its 0-based index in `header`. Missing names, a
    number past the last column and a mapped name that two columns share are refused."""
    _missing_columns(where, wanted, required, [h for h in header if h], hint)
    cols: dict[str | int, int] = {}
    for f, col in wanted.items():
        if isinstance(col, int):
            if col > len(header):
                raise StageError(
                    f"{where}: fields maps {f!r} to column {col}, but the header has {_count(len(header), 'column')}."
                )
            cols[col] = col - 1
            continue
        at = [j for j, h in enumerate(header) if h == col]
        if len(at) > 1:
            named = " and ".join(_column_label(j, letters) for j in at)
            raise StageError(
                f"{where}: {len(at)} columns are named {col!r} (columns {named}), so it is ambiguous which one "
                f"{f!r} reads; pick one by its number (fields: {{{f}: {at[0] + 1}}} reads column "
                f"{_column_label(at[0], letters)})."
            )
        if at:
            cols[col] = at[0]
    return cols


def _header_hint(
    rows: Iterable[Sequence[Any]], first: int, wanted: dict[str, str | int], src_name: str
) -> str:
    """'; row N holds them: set header_row: N ...' when one of the next rows holds every mapped name."""
    names = {c for c in wanted.values() if isinstance(c, str)}
    for r, values in enumerate(rows, first):
        if r >= first + 10:
            break
        if names and names <= {_norm_header(v) for v in values or ()}:
            return f"; row {r} holds them: set header_row: {r} on source {src_name!r}"
    return ""


def _progress(it: Iterable[Any], total: int | None, desc: str) -> Iterable[Any]:
    if total is not None and total < PROGRESS_MIN_ROWS:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, unit="rows", mininterval=2.0)


_NOTHING: dict[str, Any] = {}
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _json_type(v: Any) -> str:
    return "null" if v is None else _JSON_TYPES.get(type(v), type(v).__name__)


def _iter_json(
    path: Path,
    label: str,
    wanted: dict[str, str],
    required: dict[str, bool],
    kind: str,
    records_key: str | None,
) -> Iterator[_Raw]:
    """A .json or .jsonl file in whichever layout it holds (detected from the content, logged when it
    differs from the kind): JSON Lines, a JSON array of objects, or an object holding the records list
    under a key. A document is parsed whole with json.loads: peak memory was 3.5x the file size on a
    51 MB array (the same records as JSON Lines: 5.4x); by that ratio a 500 MB array needs ~2 GB."""
    text = _read_text(path, label)
    doc = _json_document(text, label, kind, records_key, wanted, required)
    if doc is None:
        yield from _iter_jsonl(text, label, wanted, required)
        return
    del text
    records = _json_records(doc, label, records_key, wanted, required)
    if not records:
        raise StageError(f"{label}: the JSON {_json_type(doc)} holds no records.")
    for i, obj in enumerate(_progress(records, len(records), f"read {label}"), 1):
        if not isinstance(obj, dict):
            raise StageError(f"{label} record {i}: expected a JSON object, got a JSON {_json_type(obj)}.")
        if not obj:  # {}: a blank row, counted like any reader's
            yield _Raw(label, "record", i, _NOTHING.get)
            continue
        _missing_columns(f"{label} record {i}", wanted, required, list(obj))
        yield _Raw(label, "record", i, obj.get)


def _json_document(
    text: str,
    label: str,
    kind: str,
    records_key: str | None,
    wanted: dict[str, str],
    required: dict[str, bool],
) -> Any:
    """The parsed JSON document, or None when the text is JSON Lines (one object per line)."""
    stripped = text.lstrip()
    head = stripped[:1]
    if kind == "jsonl" and head != "[" and records_key is None:
        first = stripped.split("\n", 1)[0].strip()
        try:
            obj = json.loads(first)
        except json.JSONDecodeError:
            if first != "{":  # a bad first line; a lone "{" opens a pretty-printed document
                return None
        else:
            # One line holding {"data": [...]} is a document; any other parsed line starts JSON Lines.
            one_line = not stripped.rstrip().count("\n")
            if not (
                one_line
                and isinstance(obj, dict)
                and _records_holder(obj)
                and not _has_columns(obj, wanted, required)
            ):
                return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and head == "{":  # several top-level objects: JSON Lines
            if kind == "json":
                log.info("%s: JSON Lines (one object per line), read line by line", label)
            return None
        raise StageError(
            f"{label} line {e.lineno}: malformed JSON ({_json_msg(e)} column {e.colno})."
        ) from None
    if kind == "jsonl":
        log.info("%s: a JSON %s, not JSON Lines; read as kind json", label, _json_type(doc))
    return doc


def _json_msg(e: json.JSONDecodeError) -> str:
    """The decoder's message ready for ' column N': some already end in 'at' ('... starting at')."""
    return e.msg if e.msg.endswith(" at") else f"{e.msg} at"


def _records_holder(obj: dict[str, Any]) -> list[str]:
    """Top-level keys whose value is a non-empty list of objects."""
    return [k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]


def _has_columns(obj: dict[str, Any], wanted: dict[str, str], required: dict[str, bool]) -> bool:
    return all(col in obj for f, col in wanted.items() if required[f])


def _json_records(
    doc: Any, label: str, records_key: str | None, wanted: dict[str, str], required: dict[str, bool]
) -> list[Any]:
    """The records list of a JSON document: the array itself, or the list under `records_key` (or under
    the object's only key that holds a list of objects)."""
    if isinstance(doc, list):
        if records_key is not None:
            raise StageError(
                f"{label}: records_key is {records_key!r} but the file is a JSON array, not an object."
            )
        return doc
    if not isinstance(doc, dict):
        raise StageError(f"{label}: expected a JSON array of objects, got a JSON {_json_type(doc)}.")
    keys = _q(list(doc)[:12]) + (", ..." if len(doc) > 12 else "")
    if records_key is not None:
        if records_key not in doc:
            raise StageError(
                f"{label}: there is no top-level key {records_key!r} (records_key; keys: {keys or 'none'})."
            )
        recs = doc[records_key]
        if not isinstance(recs, list):
            raise StageError(
                f"{label}: key {records_key!r} holds a JSON {_json_type(recs)}, not a list of records."
            )
        log.info("%s: records under the key %r (records_key)", label, records_key)
        return recs
    holders = _records_holder(doc)
    if len(holders) == 1:
        log.info(
            "%s: records under the key %r (the only list of objects; records_key picks another)",
            label,
            holders[0],
        )
        return doc[holders[0]]
    if len(holders) > 1:
        raise StageError(
            f"{label}: several top-level keys hold lists of records ({_q(holders)}); set records_key on the source to pick one."
        )
    if _has_columns(doc, wanted, required):
        return [doc]  # a single record
    raise StageError(
        f"{label}: a JSON object with no list of records under any key (keys: {keys or 'none'}); give a JSON array "
        "or set records_key on the source."
    )


def _iter_jsonl(text: str, label: str, wanted: dict[str, str], required: dict[str, bool]) -> Iterator[_Raw]:
    # A raw CR cannot sit inside a JSON string, so a file without LF but with CR (classic Mac, some
    # exporters) has CR-only line endings.
    sep = "\n"
    if "\r" in text and "\n" not in text:
        log.info("%s: CR-only line endings, read as line breaks", label)
        sep = "\r"
    lines = text.split(sep)  # not splitlines(): U+2028 may sit unescaped inside a JSON string
    if lines and not lines[-1].strip():
        lines.pop()
    seen = False
    for i, line in enumerate(_progress(lines, len(lines), f"read {label}"), 1):
        if not line.strip():
            yield _Raw(label, "line", i, _NOTHING.get)  # a blank row, counted like any reader's
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"{label} line {i}: malformed JSON ({_json_msg(e)} column {e.colno}).") from None
        if not isinstance(obj, dict):
            raise StageError(f"{label} line {i}: expected a JSON object, got {type(obj).__name__}.")
        _missing_columns(f"{label} line {i}", wanted, required, list(obj))
        seen = True
        yield _Raw(label, "line", i, obj.get)
    if not seen:
        raise StageError(f"{label}: the file is empty.")


def _iter_table(
    df: Any, label: str, wanted: dict[str, str], required: dict[str, bool], first_row: int, unit: str
) -> Iterator[_Raw]:
    df.columns = [_norm_header(c) for c in df.columns]
    _missing_columns(label, wanted, required, list(df.columns))
    if len(df) == 0:
        raise StageError(f"{label}: has a header row but no data rows.")
    cols = [c for c in dict.fromkeys(wanted.values()) if c in df.columns]
    data = {c: df[c].tolist() for c in cols}
    for i in _progress(range(len(df)), len(df), f"read {label}"):
        vals = {c: data[c][i] for c in cols}
        yield _Raw(label, unit, i + first_row, vals.get)


def _iter_csv(
    path: Path, label: str, wanted: dict[str, str], required: dict[str, bool], src: SourceCfg
) -> Iterator[_Raw]:
    """A CSV read as strings. The header is line 1 (or `header_row`) and is read raw, not by pandas,
    which would rename a repeated name to `name.1`. Row numbers are the spreadsheet's."""
    import pandas as pd

    text = _read_text(path, label)
    skip = (src.header_row or 1) - 1
    try:
        df = pd.read_csv(
            io.StringIO(text),
            header=None,
            skiprows=skip,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            skip_blank_lines=False,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        why = str(e).strip().splitlines()[0].rstrip(".")
        title = (
            "; if the column names are not on the first line, set header_row on the source"
            if not skip
            else ""
        )
        raise StageError(f"{label}: malformed CSV ({why}){title}.") from None
    header = [_norm_header(h) for h in df.iloc[0].tolist()]
    try:
        cols = _header_columns(label, header, wanted, required, letters=False)
    except StageError as e:
        hint = "" if skip else _header_hint(df.iloc[1:11].values.tolist(), 2, wanted, src.name)
        if not hint:
            raise
        raise StageError(f"{str(e)[:-1]}{hint}.") from None
    n = len(df) - 1
    if n == 0:
        raise StageError(f"{label}: has a header row but no data rows.")
    data = {c: df.iloc[1:, j].tolist() for c, j in cols.items()}
    del df
    for i in _progress(range(n), n, f"read {label}"):
        vals = {c: data[c][i] for c in cols}
        yield _Raw(label, "row", skip + i + 2, vals.get)


def _iter_parquet(
    path: Path, label: str, wanted: dict[str, str], required: dict[str, bool]
) -> Iterator[_Raw]:
    import pandas as pd

    if path.stat().st_size == 0:
        raise StageError(f"{label}: the file is empty.")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise StageError(f"{label}: not a readable Parquet file ({type(e).__name__}).") from None
    yield from _iter_table(df, label, wanted, required, first_row=1, unit="row")


@functools.cache
def ensure_defusedxml() -> None:
    """openpyxl parses with defusedxml when it is installed; refuse to read Excel without it."""
    import openpyxl.xml

    if not getattr(openpyxl.xml, "DEFUSEDXML", False):
        raise StageError(
            "openpyxl is not using defusedxml (pip install defusedxml) so .xlsx files are refused."
        )
    log.info("openpyxl parses XML with defusedxml")


def check_xlsx_safe(path: Path, label: str, max_mb: float) -> None:
    """Refuse an .xlsx before parsing when its declared uncompressed size or ratio is too large.

    Reads only the zip's central directory, so a bomb is refused without inflating it.
    """
    if path.stat().st_size == 0:
        raise StageError(f"{label}: the file is empty.")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile:
        raise StageError(f"{label}: not a valid .xlsx file (it is not a zip archive).") from None
    total = sum(i.file_size for i in infos)
    packed = sum(i.compress_size for i in infos)
    if total > max_mb * 2**20:
        raise StageError(
            f"{label}: uncompressed size {total / 2**20:.1f} MB exceeds data.max_xlsx_mb={max_mb:g}; refusing to open it."
        )
    ratio = total / max(packed, 1)
    if total > 2**20 and ratio > MAX_XLSX_RATIO:
        raise StageError(
            f"{label}: compression ratio {ratio:.0f}:1 exceeds {MAX_XLSX_RATIO:.0f}:1 (a zip bomb?); refusing to open it."
        )


_FORMULA_TAG = re.compile(rb"<(?:\w+:)?f[\s>/]")


def _has_formulas(path: Path) -> bool:
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.filename.startswith("xl/worksheets/") and info.filename.endswith(".xml"):
                tail = b""
                with zf.open(info) as fh:
                    while chunk := fh.read(1 << 20):
                        if _FORMULA_TAG.search(tail + chunk):
                            return True
                        tail = chunk[-16:]
    return False


def _pick_sheets(wb: Any, sheet: str | int | None, label: str) -> list[str]:
    names = list(wb.sheetnames)
    if sheet is None:
        return names
    if isinstance(sheet, int):
        if not 0 <= sheet < len(names):
            raise StageError(f"{label}: there is no sheet number {sheet} (sheets: {_q(names)}).")
        return [names[sheet]]
    if sheet not in names:
        raise StageError(f"{label}: there is no sheet named {sheet!r} (sheets: {_q(names)}).")
    return [sheet]


def _iter_xlsx(
    path: Path, label: str, wanted: dict[str, str], required: dict[str, bool], src: SourceCfg, max_mb: float
) -> Iterator[_Raw]:
    """All sheets (or the one named by `sheet`) concatenated, like the notebook's
    `pd.concat(pd.read_excel(f, sheet_name=None, engine="openpyxl").values())`, read with openpyxl
    directly so that errors can name the sheet, row and cell."""
    import openpyxl
    from openpyxl.utils import get_column_letter

    check_xlsx_safe(path, label, max_mb)
    ensure_defusedxml()
    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # corrupt workbook parts raise several types
        raise StageError(f"{label}: not a readable .xlsx workbook ({type(e).__name__}).") from None
    try:
        sheets = _pick_sheets(wb, src.sheet, label)
        formulas = _formula_cells(path, sheets) if _has_formulas(path) else {}
        # AI Hub workbooks often open with a description sheet: say which param reads only the data.
        hint = (
            f"; set sheet: on source {src.name!r} to the sheet that holds them (sheets: {_q(wb.sheetnames)})"
            if len(wb.sheetnames) > 1
            else ""
        )
        for name in sheets:
            ws = wb[name]
            ws.reset_dimensions()  # dimension tags written by other tools are often wrong
            where = f"{label} sheet {name!r}"
            rows = ws.iter_rows(values_only=True)
            header: list[str] | None = None
            n_data = 0
            for r, values in enumerate(rows, 1):
                if header is None:
                    filled = bool(values) and any(v is not None and str(v).strip() for v in values)
                    if src.header_row is not None and r == src.header_row and not filled:
                        raise StageError(f"{where} row {r}: the header row (header_row: {r}) is empty.")
                    if filled and (src.header_row is None or r == src.header_row):
                        header = [_norm_header(v) for v in values]
                        try:
                            cols = _header_columns(where, header, wanted, required, True, hint)
                        except StageError as e:
                            below = "" if src.header_row else _header_hint(rows, r + 1, wanted, src.name)
                            if not below:
                                raise
                            raise StageError(f"{str(e)[:-1]}{below}.") from None
                    continue
                vals = {c: values[j] if j < len(values) else None for c, j in cols.items()}
                for c, j in cols.items():
                    f = formulas.get((name, r, j))
                    if f is not None and vals[c] is None:
                        raise StageError(
                            f"{where} cell {get_column_letter(j + 1)}{r}: formula {f!r} has no cached value "
                            "(open and save the file in Excel, or paste values)."
                        )
                n_data += 1
                yield _Raw(
                    where,
                    "row",
                    r,
                    vals.get,
                    lambda c, r=r, cols=cols: f"{get_column_letter(cols[c] + 1)}{r}" if c in cols else None,
                )
            if header is None:
                if src.header_row is not None:
                    raise StageError(f"{where}: the sheet has no row {src.header_row} (header_row).")
                raise StageError(f"{where}: the sheet is empty.")
            if n_data == 0:
                raise StageError(f"{where}: has a header row but no data rows.")
    finally:
        wb.close()


def _formula_cells(path: Path, sheets: list[str]) -> dict[tuple[str, int, int], str]:
    """(sheet, row, column index) -> formula text, for every formula cell of the sheets we read."""
    import openpyxl

    out: dict[tuple[str, int, int], str] = {}
    wb = openpyxl.load_workbook(path, read_only=True, data_only=False)
    try:
        for name in sheets:
            ws = wb[name]
            ws.reset_dimensions()
            for r, values in enumerate(ws.iter_rows(values_only=True), 1):
                for j, v in enumerate(values or ()):
                    text = getattr(v, "text", v)  # ArrayFormula keeps its text in .text
                    if isinstance(text, str) and text.startswith("="):
                        out[(name, r, j)] = text
    finally:
        wb.close()
    return out


def _iter_hf(src: SourceCfg, root: Path, wanted: dict[str, str], required: dict[str, bool]) -> Iterator[_Raw]:
    import datasets

    label = f"{src.hub_id}@{src.revision} split {src.split!r}"
    hub_id = src.hub_id or ""
    local = Path(hub_id)
    # A hub_id that names a local folder (a mirror, or a test fixture) is held to the same path rule.
    if local.is_absolute() or ".." in local.parts or (root / local).exists():
        if ".." in local.parts or not _inside((root / local).resolve(), root.resolve()):
            raise StageError(
                f"source {src.name!r}: hub_id {hub_id!r} is a path outside the repository root; refusing it."
            )
        hub_id = str((root / local).resolve())
    try:
        ds = datasets.load_dataset(hub_id, name=src.config, revision=src.revision, split=src.split)
    except Exception as e:  # network, missing revision/config/split: one sentence
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StageError(f"source {src.name!r}: could not load {label} ({msg.rstrip('.')}).") from None
    _missing_columns(label, wanted, required, list(ds.column_names))
    if src.limit is not None:
        ds = ds.select(range(min(src.limit, len(ds))))
    if len(ds) == 0:
        raise StageError(f"{label}: the split has no rows.")
    cols = [c for c in dict.fromkeys(wanted.values()) if c in ds.column_names]
    data = ds.select_columns(cols).to_dict()
    for i in _progress(range(len(ds)), len(ds), f"read {src.name}"):
        vals = {c: data[c][i] for c in cols}
        yield _Raw(label, "row", i, vals.get, file=label)


def _column_key(col: str | int) -> str | int:
    """A `fields` value as the readers look it up: a normalised name, or a 1-based column number."""
    return col if isinstance(col, int) else unicodedata.normalize("NFC", col).strip()


def source_fields(src: SourceCfg) -> FieldMap:
    """Schema field -> source column (a field not mapped reads the column of its own name)."""
    schema = SCHEMAS[src.task]
    unknown = [f for f in src.fields if f not in schema]
    if unknown:
        raise StageError(
            f"source {src.name!r}: fields names {_q(unknown)}, not in the {src.task} schema ({', '.join(schema)})."
        )
    return FieldMap(
        {f: _column_key(src.fields.get(f, f)) for f in schema if f not in MAPPED_ONLY or f in src.fields},
        defaulted=[f for f in schema if f not in src.fields and f not in MAPPED_ONLY],
    )


# Fields that may hold a number (an MCQ's answer 3, its id, an option such as 0.5); every other field
# is text, and a number, boolean, date, list or object there is data.non_text's business.
NUMBER_OK: dict[str, frozenset[str]] = {"mcq": frozenset({"answer", "id", *MCQ_LETTERS})}
SHOW_FIRST = 5  # places listed in an error or warning, before "and N more"


@dataclass
class Skipped:
    """Rows read_source left out: blank ones (every mapped field empty; skipped, never a loss), rows with
    an empty required field (incomplete) and rows with a non-text value (data.non_text=count); the first
    places of each loss, for the sentences that report it."""

    blank: int = 0
    incomplete: int = 0
    non_text: int = 0
    first: dict[str, list[str]] = field(default_factory=lambda: {"incomplete": [], "non_text": []})

    def note(self, reason: str, place: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        if len(self.first[reason]) < SHOW_FIRST:
            self.first[reason].append(place)

    def places(self, reason: str) -> str:
        """'f row 3 column 'x', f row 9 column 'x' and 4 more'."""
        shown = self.first[reason]
        more = getattr(self, reason) - len(shown)
        return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _kind_of(v: Any) -> str:
    """How a non-text value reads in a sentence: a number, a boolean, a date, a JSON list/object."""
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, list | tuple):
        return "list"
    if isinstance(v, dict):
        return "object"
    if hasattr(v, "isoformat"):
        return (
            "date" if type(v).__name__ == "date" else "date/time" if hasattr(v, "hour") else type(v).__name__
        )
    if hasattr(v, "item"):  # numpy scalars
        return _kind_of(v.item())
    return type(v).__name__


def _is_text(v: Any) -> bool:
    """Text, or nothing (None, a missing float NaN)."""
    return v is None or isinstance(v, str) or (isinstance(v, float) and math.isnan(v))


def read_source(
    src: SourceCfg, root: Path, max_xlsx_mb: float, non_text: str = "fail"
) -> tuple[list[Row], Skipped]:
    """Rows of a source in its schema (normalised text), and what was left out (`Skipped`).

    One rule in every reader: a row whose mapped fields are all empty is blank, skipped and counted.
    A row with an empty required field is an incomplete row: counted as a loss (with its first places)
    and left out. A text field holding a number, boolean, date, list or object fails the source with one
    sentence listing the first places and the total (non_text=fail), or is a counted loss (count).
    Applies `limit` (the first N rows read, blank ones included). Raises StageError on any other
    contract breach: missing or ambiguous columns, empty or undecodable files, formula cells without a
    cached value.
    """
    wanted = source_fields(src)
    required = SCHEMAS[src.task]
    number_ok = NUMBER_OK.get(src.task, frozenset())
    if src.kind == "hf":
        raws: Iterable[_Raw] = _iter_hf(src, root, wanted, required)
    else:
        raws = _iter_files(src, root, wanted, required, max_xlsx_mb)
    rows: list[Row] = []
    skipped = Skipped()
    n_read = 0
    for raw in raws:
        if src.limit is not None and n_read >= src.limit:
            break
        n_read += 1
        texts: dict[str, str] = {}
        odd: list[str] = []  # places of non-text values in this row
        for f, col in wanted.items():
            v = raw.get(col)
            t = (
                _cell_text(v)
                if f in number_ok
                else (v if isinstance(v, str) else "" if _is_text(v) else None)
            )
            if t is None:
                where = f" (cell {raw.cell(col)})" if raw.cell else ""
                odd.append(
                    f"{raw.where} {raw.unit} {raw.n}{where} column {col!r} holds a {_kind_of(v)} ({v!r:.40})"
                )
                t = ""
            texts[f] = t
        values = {f: normalize_text(t) if t else "" for f, t in texts.items()}
        if odd:  # fail lists every value; count counts rows (one loss each)
            for place in odd if non_text == "fail" else odd[:1]:
                skipped.note("non_text", place)
            continue
        if not any(values.values()):
            skipped.blank += 1
            continue
        empty = [wanted[f] for f, req in required.items() if req and not values[f]]
        if empty:
            col = empty[0]
            where = f" (cell {raw.cell(col)})" if raw.cell else ""
            skipped.note("incomplete", f"{raw.where} {raw.unit} {raw.n}{where} column {col!r}")
            continue
        rows.append(
            Row(
                src.name,
                src.task,
                raw.where,
                raw.unit,
                raw.n,
                wanted,
                (src.task, *texts.values()),
                values,
                raw.file,
            )
        )
    if skipped.non_text and non_text == "fail":
        raise StageError(
            f"source {src.name!r}: {_count(skipped.non_text, 'non-text value')} where text belongs "
            f"(data.non_text=fail): {skipped.places('non_text')}; map fields to the columns that hold the text, "
            "or set data.non_text=count to leave such rows out as a counted loss."
        )
    return rows, skipped


def _iter_files(
    src: SourceCfg, root: Path, wanted: dict[str, str], required: dict[str, bool], max_xlsx_mb: float
) -> Iterator[_Raw]:
    for path in resolve_source_files(src, root):
        label = display(path, root)
        if src.kind in ("jsonl", "json"):
            raws = _iter_json(path, label, wanted, required, src.kind, src.records_key)
        elif src.kind == "csv":
            raws = _iter_csv(path, label, wanted, required, src)
        elif src.kind == "parquet":
            raws = _iter_parquet(path, label, wanted, required)
        else:
            raws = _iter_xlsx(path, label, wanted, required, src, max_xlsx_mb)
        for raw in raws:
            raw.file = label
            yield raw


# --------------------------------------------------------------------------- row checks


def check_languages(src: SourceCfg, rows: list[Row], min_share: float) -> dict[str, float]:
    """The share of a translation source's ko values that are mostly Hangul and of its en values that
    are mostly Latin; a share under `min_share` refuses the mapping (swapped columns, an ID column)."""
    shares = {}
    for side in ("ko", "en"):
        hits = sum(main_script(r.values[side]) == side for r in rows)
        shares[side] = hits / len(rows) if rows else 1.0
    bad = [side for side in ("ko", "en") if shares[side] < min_share]
    if bad:
        cols = " and ".join(f"{side}: {rows[0].cols[side]!r}" for side in bad)
        measured = " and ".join(
            f"{percent(shares[side] * len(rows), len(rows))} of the {side!r} values are mostly "
            + ("Hangul" if side == "ko" else "Latin")
            for side in bad
        )
        swapped = (
            "swap them"
            if all(shares[side] < min_share for side in ("ko", "en"))
            and sum(main_script(r.values["ko"]) == "en" for r in rows) >= min_share * len(rows)
            else "map them to the columns that hold the Korean and English text"
        )
        verb = "fields" if len(bad) > 1 else "field"
        do = "do" if len(bad) > 1 else "does"
        raise StageError(
            f"source {src.name!r}: {verb} {cols} {do} not hold {' and '.join(LANG_NAMES[s] for s in bad)} text: "
            f"{measured} (of {_count(len(rows), 'row')}; data.min_lang_share={min_share:g}); {swapped}."
        )
    return shares


LANG_NAMES = {"ko": "Korean", "en": "English"}


def apply_pii(rows: list[Row], mode: str, counts: Counter[str]) -> None:
    """Mask (counting by kind), fail on, or ignore RRNs and phone numbers in every field of `rows`."""
    if mode == "off":
        return
    for row in rows:
        for f, v in row.values.items():
            if not v:
                continue
            if mode == "fail":
                kind = find_pii(v)
                if kind:
                    raise StageError(
                        f"{row.loc()}: column {row.cols[f]!r} contains a {PII_KINDS[kind]} (data.pii=fail)."
                    )
            else:
                masked, c = mask_pii(v)
                if c:
                    row.values[f] = masked
                    counts.update(c)


def dedup(rows: list[Row]) -> tuple[list[Row], int, int]:
    """Drop exact then normalised duplicates (first occurrence kept): rows, n_exact, n_normalised."""
    seen_raw: set[tuple[str, ...]] = set()
    seen_norm: set[tuple[str, ...]] = set()
    out: list[Row] = []
    exact = normed = 0
    for row in rows:
        if row.raw in seen_raw:
            exact += 1
            continue
        seen_raw.add(row.raw)
        key = (row.task, *row.values.values())
        if key in seen_norm:
            normed += 1
            continue
        seen_norm.add(key)
        out.append(row)
    return out, exact, normed


def parse_mcq_answer(value: str | int | float) -> str | None:
    """'A'..'E' (any case, '(c)', 'C.'), or 1..5 as int or text ('3', '3.0') -> letter; else None."""
    s = str(value).strip().strip("().").strip().upper()
    if s in MCQ_LETTERS:
        return s
    try:
        f = float(s)
    except ValueError:
        return None
    if f.is_integer() and 1 <= int(f) <= 5:
        return MCQ_LETTERS[int(f) - 1]
    return None


def split_key(task: str, v: dict[str, str]) -> str:
    """What decides the split: the question (for translations, the Korean side of the pair)."""
    if task == "reasoning":
        return match_key(v["question"])
    if task == "instruction":
        return match_key(instruction_question(v["instruction"], v["input"]))
    return match_key(v["ko"])


def overlap_keys(task: str, v: dict[str, str]) -> list[str]:
    if task == "reasoning":
        return [match_key(v["question"])]
    if task == "instruction":
        return [match_key(v["instruction"]), match_key(instruction_question(v["instruction"], v["input"]))]
    return [match_key(v["ko"]), match_key(v["en"])]


def instruction_question(instruction: str, inp: str) -> str:
    return instruction + ("\n\n" + inp if inp else "")


# --------------------------------------------------------------------------- eval sets


@dataclass
class EvalSets:
    mcq: list[dict[str, Any]]
    koen: list[dict[str, Any]]
    keys: set[str]
    metrics: dict[str, Any]


def build_eval(cfg: DataCfg, root: Path) -> EvalSets:
    """Held-out MCQ and Ko-En pairs, plus the match keys that train/val must never contain."""
    metrics: dict[str, Any] = {}
    for src in cfg.eval.mcq_sources:
        if src.task != "mcq":
            raise StageError(f"data.eval.mcq source {src.name!r} must have task 'mcq', not {src.task!r}.")
    if cfg.eval.koen.task not in ("pairs", "translation"):
        raise StageError(
            f"data.eval.koen source {cfg.eval.koen.name!r} must have task 'pairs', not {cfg.eval.koen.task!r}."
        )
    pii: Counter[str] = Counter()

    rows = []
    problems: list[str] = []
    for src in cfg.eval.mcq_sources:
        got, sk = read_source(src, root, cfg.max_xlsx_mb, cfg.non_text)
        problems += _eval_skipped(metrics, src, len(got), sk, cfg)
        rows += got
    apply_pii(rows, cfg.pii, pii)
    mcq, mcq_dups = mcq_items(rows)
    metrics["eval.mcq_rows"] = len(mcq)
    for k, n in mcq_dups.items():
        metrics[f"eval.mcq_duplicates.{k}"] = n

    rows, sk = read_source(cfg.eval.koen, root, cfg.max_xlsx_mb, cfg.non_text)
    problems += _eval_skipped(metrics, cfg.eval.koen, len(rows), sk, cfg)
    if problems:
        raise StageError(_one_sentence("data.eval", problems))
    check_languages(cfg.eval.koen, rows, cfg.min_lang_share)
    apply_pii(rows, cfg.pii, pii)
    rows, exact, normed = dedup(rows)
    metrics["eval.koen_duplicates.exact"] = exact
    metrics["eval.koen_duplicates.normalized"] = normed
    koen = [
        {
            "id": short_hash("pair", r.values["ko"], r.values["en"]),
            "source": r.source,
            "ko": r.values["ko"],
            "en": r.values["en"],
        }
        for r in rows
    ]
    metrics["eval.koen_rows"] = len(koen)
    metrics["eval.dropped.duplicate"] = sum(mcq_dups.values()) + exact + normed
    metrics["eval.pii_masked"] = sum(pii.values())

    keys = {match_key(m["question"]) for m in mcq}
    for p in koen:
        keys.add(match_key(p["ko"]))
        keys.add(match_key(p["en"]))
    return EvalSets(mcq, koen, keys, metrics)


def _eval_skipped(
    metrics: dict[str, Any], src: SourceCfg, n_rows: int, sk: Skipped, cfg: DataCfg
) -> list[str]:
    """Record an eval source's rows in, blank and lost in `metrics`; the loss contract's sentence (without
    its period) when more than data.max_loss_share of its non-blank rows were lost."""
    lost = sk.incomplete + sk.non_text
    offered = n_rows + lost
    metrics[f"eval.rows_in.{src.name}"] = offered + sk.blank
    metrics[f"eval.blank.{src.name}"] = sk.blank
    metrics[f"eval.incomplete.{src.name}"] = sk.incomplete
    metrics[f"eval.non_text.{src.name}"] = sk.non_text
    if not lost:
        return []
    why = ", ".join(
        f"{_count(n, 'row')} {what} ({sk.places(reason)})"
        for reason, n, what in (
            ("incomplete", sk.incomplete, "with an empty required cell"),
            ("non_text", sk.non_text, "with a non-text value"),
        )
        if n
    )
    msg = f"data.eval source {src.name!r}: {lost} of {_count(offered, 'row')} ({percent(lost, offered)}) left out: {why}"
    if lost / offered > cfg.max_loss_share:
        limit = f"more than data.max_loss_share={cfg.max_loss_share:g}"
        return [f"{msg}, {limit}; fill those cells or map fields to the columns that hold the text"]
    log.warning("%s.", msg)
    return []


def _one_sentence(scope: str, problems: list[str]) -> str:
    """Several problems (sentences without their period) as one sentence, or the one problem alone."""
    if len(problems) == 1:
        return problems[0] + "."
    return (
        f"{scope}: {len(problems)} problems: "
        + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        + "."
    )


def mcq_items(rows: list[Row]) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Eval MCQ records from rows, de-duplicated on the item (the mapped id, if any, and the normalised
    question and options) with its parsed answer, so 'B' and '2' are the same answer. The same item
    with a different answer is a contract breach. Returns the records and the duplicates dropped by
    reason: exact (the same row), normalized (equal after normalising the text), answer_format (the
    same answer written another way: letter vs number)."""
    dups: Counter[str] = Counter({"exact": 0, "normalized": 0, "answer_format": 0})
    seen: dict[tuple[str, ...], tuple[Row, str]] = {}
    out: list[dict[str, Any]] = []
    for row in rows:
        v = row.values
        letter = parse_mcq_answer(v["answer"])
        col = row.cols["answer"]
        if letter is None:
            raise StageError(
                f"{row.loc()}: column {col!r} holds {v['answer']!r}, not a letter A-E or a number 1-5."
            )
        options = {k: v[k] for k in MCQ_LETTERS if v[k]}
        if letter not in options:
            raise StageError(f"{row.loc()}: column {col!r} names option {letter}, which is empty.")
        item_id = v.get("id", "")
        key = (match_key(item_id), match_key(v["question"]), *(match_key(v[k]) for k in MCQ_LETTERS))
        if key in seen:
            first, first_letter = seen[key]
            if first_letter != letter:
                raise StageError(
                    f"{first.loc()} and {row.loc()}: the same question and options with different answers "
                    f"({first_letter} and {letter})."
                )
            if first.raw == row.raw:
                dups["exact"] += 1
            elif match_key(first.values["answer"]) == match_key(v["answer"]):
                dups["normalized"] += 1
            else:
                dups["answer_format"] += 1
            continue
        seen[key] = (row, letter)
        out.append(
            {
                "id": short_hash("mcq", *([item_id] if item_id else []), v["question"], *options.values()),
                "source": row.source,
                "file": row.file,
                "subject": v.get("subject", ""),
                "question": v["question"],
                "options": options,
                "answer": letter,
            }
        )
    return out, dups


# --------------------------------------------------------------------------- training records


@dataclass(slots=True)
class _Rec:
    source: str
    task: str
    key: str  # split key
    id: str
    question: str
    cot: str | None
    answer: str
    prompt: str = ""
    completion: str = ""
    n_prompt: int = 0
    n_tokens: int = 0
    truncated: bool = False


def _records(row: Row, task: str, direction: str, think: str) -> list[_Rec]:
    v = row.values
    key = split_key(task, v)
    empty_think = "" if think in ("empty", "masked") else None
    if task == "reasoning":
        return [
            _Rec(
                row.source,
                task,
                key,
                short_hash(task, v["question"], v["cot"], v["answer"]),
                v["question"],
                v["cot"],
                v["answer"],
            )
        ]
    if task == "instruction":
        q = instruction_question(v["instruction"], v["input"])
        return [_Rec(row.source, task, key, short_hash(task, q, v["output"]), q, empty_think, v["output"])]
    out = []
    if direction in ("ko2en", "both"):
        out.append(
            _Rec(
                row.source,
                task,
                key,
                short_hash(task, "ko2en", v["ko"], v["en"]),
                f"{KO2EN_INSTRUCTION}\n\n{v['ko']}",
                empty_think,
                v["en"],
            )
        )
    if direction in ("en2ko", "both"):
        out.append(
            _Rec(
                row.source,
                task,
                key,
                short_hash(task, "en2ko", v["ko"], v["en"]),
                f"{EN2KO_INSTRUCTION}\n\n{v['en']}",
                empty_think,
                v["ko"],
            )
        )
    return out


def token_lengths(
    tokenizer: Any, texts: Sequence[str], add_special_tokens: bool, desc: str = "tokenize"
) -> list[int]:
    """Token counts of `texts`, tokenized in batches (much faster than one by one).

    Uses the Rust backend's offset-free batch encoder when the tokenizer has one (same ids as
    `tokenizer(texts)`), with its thread pool on for the call: this process does not fork meanwhile,
    and kmed.io's TOKENIZERS_PARALLELISM=false is restored afterwards.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    out: list[int] = []
    bar = None
    if len(texts) >= PROGRESS_MIN_ROWS:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc=desc, unit="rows", mininterval=2.0)
    with _tokenizers_parallel():
        for s in range(0, len(texts), TOKENIZE_BATCH):
            batch = list(texts[s : s + TOKENIZE_BATCH])
            if fast is not None:
                out.extend(len(e.ids) for e in fast(batch, add_special_tokens=add_special_tokens))
            else:
                enc = tokenizer(
                    batch,
                    add_special_tokens=add_special_tokens,
                    return_attention_mask=False,
                    return_token_type_ids=False,
                    verbose=False,
                )
                out.extend(len(ids) for ids in enc["input_ids"])
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    return out


@contextlib.contextmanager
def _tokenizers_parallel() -> Iterator[None]:
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _decode_prefix(tokenizer: Any, ids: list[int]) -> str:
    # A byte-level cut can split a multi-byte character; drop the dangling replacement char.
    return (
        tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        .rstrip("\ufffd")
        .rstrip()
    )


def truncate_completion(
    tokenizer: Any,
    rec_cot: str | None,
    answer: str,
    eos: str,
    n_prompt: int,
    max_len: int,
    min_cot: int = 0,
    min_keep_share: float = 0.0,
) -> tuple[str, int, float] | str:
    """The completion shortened to fit `max_len` with the prompt, as (text, tokens, share of the CoT's
    tokens kept), or why it cannot be.

    Only the CoT is cut; the `<think>` frame, the whole answer and the EOS are kept. Returns "question"
    when the prompt alone takes the whole length, "answer" when the prompt, the frame and the whole
    answer do not fit (or there is no CoT to shorten), and
    "cot" when the CoT would keep fewer than `min_cot` tokens or less than `min_keep_share` of them
    (or nothing at all, with both 0 aside).
    """
    if n_prompt >= max_len:
        return "question"
    if not rec_cot:
        return "answer"
    room = max_len - n_prompt - len(_ids(tokenizer, render_completion("", answer, eos)))
    if room < 0:
        return "answer"
    c_ids = _ids(tokenizer, rec_cot)
    keep = min(room, len(c_ids))
    for _ in range(64):  # re-tokenising the cut text can differ by a token or two at the seams
        if keep < min_cot or keep < min_keep_share * len(c_ids):
            return "cot"
        cot = rec_cot if keep >= len(c_ids) else _decode_prefix(tokenizer, c_ids[:keep])
        if (min_cot or min_keep_share) and not cot.strip():
            return "cot"
        comp = render_completion(cot, answer, eos)
        n = len(_ids(tokenizer, comp))
        over = n_prompt + n - max_len
        if over <= 0:
            return comp, n, (min(keep, len(c_ids)) / max(len(c_ids), 1) if cot.strip() else 0.0)
        if keep == 0:
            return "answer"
        keep = max(0, keep - over)
    return "cot"


def overlong_reason(
    tokenizer: Any, rec_cot: str | None, answer: str, eos: str, n_prompt: int, max_len: int
) -> str:
    """Why an overlong record cannot be kept whole: "question" when the prompt alone takes the whole
    length, "answer" when the prompt and the whole answer (in the empty `<think>` frame) do not fit, else
    "cot" (only its CoT is too long)."""
    if n_prompt >= max_len:
        return "question"
    if not rec_cot:
        return "answer"
    n = len(_ids(tokenizer, render_completion("", answer, eos)))
    return "answer" if n_prompt + n > max_len else "cot"


def _percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    s = sorted(values)

    def rank(p: float) -> int:  # nearest-rank percentile: an observed value, deterministic
        return s[max(0, math.ceil(p / 100 * len(s)) - 1)]

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": s[-1]}


def mask_empty_think(prompt: str, completion: str) -> tuple[str, str]:
    """think_for_non_reasoning: masked. The empty `<think>` block moves from the trained completion to the end
    of the masked prompt: the model still reads the R1 shape before the answer, but stage 2 does not learn
    to write an empty block (the seed's rendering teaches it to skip reasoning)."""
    end = completion.index(THINK_CLOSE) + len(THINK_CLOSE)
    end += completion[end:].startswith("\n")
    return prompt + completion[:end], completion[end:]


def replay_stage1(files: dict[str, list[dict[str, Any]]], share: float, seed: int) -> int:
    """data.stage2_replay: add stage-1 training records (reasoning, CoT kept) to stage 2's training split so
    that they make up `share` of it; drawn by a seeded hash of the record id, from stage 1's train split
    only (its val split and the eval sets never leak). Returns how many were added."""
    train2 = files["stage2/train.jsonl"]
    pool = list({r["id"]: r for r in files["stage1/train.jsonl"]}.values())  # weight > 1 repeats count once
    want = round(share * len(train2) / (1 - share))
    if want > len(pool):
        log.warning("data.stage2_replay=%g asks for %d stage-1 records; stage 1's train split has %d: all are replayed",
                    share, want, len(pool))
    picked = sorted(pool, key=lambda r: _unit_hash(str(seed), "replay", r["id"]))[:want]
    files["stage2/train.jsonl"] = train2 + [dict(r, replay=True) for r in picked]
    return len(picked)


def _as_dict(r: _Rec) -> dict[str, Any]:
    return {
        "id": r.id,
        "source": r.source,
        "task": r.task,
        "lang": detect_lang(r.question),
        "question": r.question,  # what evaluate asks again, in whatever prompt format
        "prompt": r.prompt,
        "completion": r.completion,
        "n_prompt_tokens": r.n_prompt,
        "n_tokens": r.n_tokens,
    }


def _keep_stats(shares: list[float]) -> dict[str, float]:
    """Mean, p10 (nearest rank) and minimum of the CoT shares kept by shortened records; 1.0 when none
    was shortened (every CoT whole)."""
    if not shares:
        return {"mean": 1.0, "p10": 1.0, "min": 1.0}
    s = sorted(shares)
    p10 = s[max(0, math.ceil(0.1 * len(s)) - 1)]
    return {"mean": round(sum(s) / len(s), 4), "p10": round(p10, 4), "min": round(s[0], 4)}


@dataclass
class SourceLoss:
    """One source's records lost on the way to the training set, and the sentences that say so.

    Counts are in records: a translation row gives one per direction (`per_row`), so a row dropped
    before rendering loses that many. Duplicates and rows left out by weight < 1 are not losses (the
    data is still there, or was left out on purpose): they only shrink what the source offers.
    """

    stage: str
    src: SourceCfg
    counts: Counter[str]  # the source's build_stage counters
    per_row: int
    max_len: int
    cfg: DataCfg
    skipped: Skipped = field(default_factory=Skipped)  # where the incomplete and non-text rows are

    @property
    def offered(self) -> int:
        c = self.counts
        return (c["rows_in"] - c["blank"] - c["duplicate"] - c["subsampled"]) * self.per_row

    @property
    def lost(self) -> int:
        c = self.counts
        return (
            (c["incomplete"] + c["non_text"] + c["eval_overlap"]) * self.per_row
            + c["overlong"]
            + c["emptied"]
        )

    @property
    def share(self) -> float:
        return self.lost / self.offered if self.offered else 0.0

    def _parts(self, in_records: bool = True) -> list[str]:
        c, cfg, k = self.counts, self.cfg, self.per_row

        def rows(n: int, what: str) -> str:
            return (
                f"{n * k} from {_count(n, 'row')} {what}"
                if in_records and k > 1
                else f"{_count(n, 'row')} {what}"
            )

        if cfg.overlong == "truncate":
            cot = (
                f"whose CoT would be cut below data.min_cot_tokens={cfg.min_cot_tokens} or "
                f"data.min_cot_keep_share={cfg.min_cot_keep_share:g}"
            )
        else:
            cot = "whose CoT would be cut (data.overlong=drop)"
        over = f"over model.max_seq_length={self.max_len}"
        sk = self.skipped
        parts = [
            (
                c["incomplete"],
                rows(c["incomplete"], f"with an empty required cell ({sk.places('incomplete')})"),
            ),
            (c["non_text"], rows(c["non_text"], f"with a non-text value ({sk.places('non_text')})")),
            (c["eval_overlap"], rows(c["eval_overlap"], "equal to a data.eval item")),
            (
                c["overlong_question"],
                f"{_count(c['overlong_question'], 'record')} {over} by the question alone",
            ),
            (
                c["overlong_answer"],
                f"{_count(c['overlong_answer'], 'record')} {over} whose answer would be cut",
            ),
            (c["overlong_cot"], f"{_count(c['overlong_cot'], 'record')} {over} {cot}"),
            (c["emptied"], f"{_count(c['emptied'], 'record')} kept with an emptied CoT"),
        ]
        return [text for n, text in parts if n]

    def _fixes(self) -> list[str]:
        c, fixes = self.counts, []
        if c["overlong"] or c["emptied"]:
            fixes.append("raise model.max_seq_length")
        if c["overlong_cot"]:
            fixes.append(
                "lower data.min_cot_tokens or data.min_cot_keep_share"
                if self.cfg.overlong == "truncate"
                else "set data.overlong=truncate"
            )
        if c["eval_overlap"]:
            fixes.append("take the data.eval items out of the source")
        if c["incomplete"] or c["non_text"]:
            fixes.append("map fields to the columns that hold the text")
        return fixes

    def _lost(self) -> str:
        return (
            f"data.{self.stage} source {self.src.name!r}: {self.lost} of {_count(self.offered, 'record')} "
            f"({percent(self.lost, self.offered)}) would be lost ({', '.join(self._parts())})"
        )

    def too_many(self) -> str:
        """The error above data.max_loss_share."""
        fixes = _either([*self._fixes(), "raise data.max_loss_share"])
        return f"{self._lost()}, more than data.max_loss_share={self.cfg.max_loss_share:g}; {fixes}."

    def logged(self) -> str:
        """The warning of a loss within data.max_loss_share."""
        return f"{self._lost()}; the stage fails above data.max_loss_share={self.cfg.max_loss_share:g}."

    def empty(self) -> str:
        """Why the source ended with no records (the error, or with allow_empty the warning)."""
        c = self.counts
        why = self._parts(in_records=False)
        if c["blank"]:
            why.append(f"{_count(c['blank'], 'row')} blank in the mapped columns")
        if c["duplicate"]:
            why.append(f"{_count(c['duplicate'], 'row')} duplicating earlier rows")
        if c["subsampled"]:
            why.append(f"{_count(c['subsampled'], 'row')} left out by weight {self.src.weight:g}")
        head = (
            f"data.{self.stage} source {self.src.name!r} ends with no records (of its {c['rows_in']} rows: "
            f"{', '.join(why)})"
        )
        if self.src.allow_empty:
            return f"{head}; allowed by allow_empty: true."
        fixes = _either([*self._fixes(), "set allow_empty: true on the source"])
        return f"{head}; {fixes}."


@dataclass
class StageData:
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    metrics: dict[str, Any]
    samples: list[tuple[str, dict[str, Any]]]  # (note, record)
    by_source: dict[str, Counter[str]]  # source -> rows in / dropped by reason / records out


def build_stage(
    name: str, scfg: StageDataCfg, cfg: DataCfg, tokenizer: Any, max_len: int, root: Path, eval_keys: set[str]
) -> StageData:
    """Read, check, split, render and measure one SFT stage's sources."""
    eos = tokenizer.eos_token
    if not eos:
        raise StageError("The base tokenizer has no eos token, so completions cannot end with one.")
    names = [s.name for s in scfg.sources]
    if len(set(names)) != len(names):
        raise StageError(f"data.{name}.sources: source names must be unique (got {_q(names)}).")
    m: dict[str, Any] = {}
    drops: Counter[str] = Counter(
        {
            "incomplete": 0,
            "non_text": 0,
            "duplicate": 0,
            "eval_overlap": 0,
            "overlong": 0,
            "overlong_question": 0,
            "overlong_answer": 0,
            "overlong_cot": 0,
            "subsampled": 0,
        }
    )
    pii: Counter[str] = Counter({"rrn": 0, "phone": 0})
    weights = {s.name: s.weight for s in scfg.sources}
    by_src: dict[str, Counter[str]] = {s.name: Counter() for s in scfg.sources}

    def count_drop(before: list[Row], after: list[Row], reason: str) -> None:
        for source, n in (Counter(r.source for r in before) - Counter(r.source for r in after)).items():
            by_src[source][reason] += n

    # Read every source: blank rows are skipped and counted (never a loss), incomplete and non-text rows
    # are counted losses; a translation mapping must yield Korean and English.
    rows: list[Row] = []
    skipped: dict[str, Skipped] = {}
    for src in scfg.sources:
        if src.task not in TRAIN_TASKS:
            raise StageError(
                f"data.{name} source {src.name!r}: task {src.task!r} is for eval sets, not training."
            )
        got, sk = read_source(src, root, cfg.max_xlsx_mb, cfg.non_text)
        if src.task == "translation":
            check_languages(src, got, cfg.min_lang_share)
        n_in = len(got) + sk.blank + sk.incomplete + sk.non_text
        log.info("%s: %s gave %d rows (%d blank)", name, src.name, n_in, sk.blank)
        m[f"{name}.rows_in.{src.name}"] = n_in
        m[f"{name}.blank.{src.name}"] = sk.blank
        by_src[src.name].update(
            {"rows_in": n_in, "blank": sk.blank, "incomplete": sk.incomplete, "non_text": sk.non_text}
        )
        drops["incomplete"] += sk.incomplete
        drops["non_text"] += sk.non_text
        skipped[src.name] = sk
        rows.extend(got)

    # PII, then duplicates across the stage's sources, then anything that equals an eval item.
    apply_pii(rows, cfg.pii, pii)
    before = rows
    rows, exact, normed = dedup(rows)
    count_drop(before, rows, "duplicate")
    drops["duplicate"] = exact + normed
    m[f"{name}.duplicates.exact"] = exact
    m[f"{name}.duplicates.normalized"] = normed
    tasks = {s.name: s.task for s in scfg.sources}
    kept = []
    for row in rows:
        if any(k in eval_keys for k in overlap_keys(tasks[row.source], row.values)):
            drops["eval_overlap"] += 1
        else:
            kept.append(row)
    count_drop(rows, kept, "eval_overlap")
    rows = kept

    # Weight < 1: a deterministic subsample of the source's rows.
    kept = []
    for row in rows:
        w = weights[row.source]
        if w < 1 and _unit_hash(str(cfg.seed), "weight", *row.values.values()) >= w:
            drops["subsampled"] += 1
        else:
            kept.append(row)
    count_drop(rows, kept, "subsampled")
    rows = kept

    # Render; the split hangs on the question so both directions of a pair land together.
    recs: list[_Rec] = []
    for row in rows:
        recs.extend(_records(row, tasks[row.source], scfg.translation_direction, cfg.think_for_non_reasoning))
    prompter = Prompter(cfg.prompt_format, cfg.system_prompt, tokenizer)
    for r in recs:
        r.prompt = prompter.prompt(r.question)
        r.completion = prompter.completion(r.prompt, r.cot, r.answer)
        if cfg.think_for_non_reasoning == "masked" and r.task != "reasoning":
            r.prompt, r.completion = mask_empty_think(r.prompt, r.completion)

    # Token lengths with the base tokenizer. An overlong record is dropped, or (truncate) kept with its
    # CoT shortened to no fewer than min_cot_tokens; the answer is never cut.
    n_p = token_lengths(tokenizer, [r.prompt for r in recs], True, f"{name} prompts")
    n_c = token_lengths(tokenizer, [r.completion for r in recs], False, f"{name} completions")
    truncated = 0
    kept_shares: list[float] = []  # share of its CoT tokens each shortened record kept
    # reasoning records that lost their CoT, by reason
    lost = {"question": 0, "answer": 0, "cot": 0, "emptied": 0}
    fitted: list[_Rec] = []
    for r, a, b in zip(recs, n_p, n_c, strict=True):
        r.n_prompt, r.n_tokens = a, a + b
        if r.n_tokens > max_len:
            if cfg.overlong == "truncate":
                cut = truncate_completion(
                    tokenizer, r.cot, r.answer, eos, a, max_len, cfg.min_cot_tokens, cfg.min_cot_keep_share
                )
            else:
                cut = overlong_reason(tokenizer, r.cot, r.answer, eos, a, max_len)
            if isinstance(cut, str):
                for k in ("overlong", f"overlong_{cut}"):
                    drops[k] += 1
                    by_src[r.source][k] += 1
                if r.task == "reasoning":
                    lost[cut] += 1
                continue
            r.completion, r.n_tokens, r.truncated = prompter.after_prompt(r.prompt, cut[0]), a + cut[1], True
            by_src[r.source]["truncated"] += 1
            truncated += 1
            kept_shares.append(cut[2])
            if cut[2] == 0:  # min_cot_tokens and min_cot_keep_share 0 allow it; still no reasoning trained
                by_src[r.source]["emptied"] += 1
                lost["emptied"] += 1
        fitted.append(r)

    # Contract: a stage whose reasoning records mostly lose their CoT to the length limit is refused.
    n_reasoning = sum(r.task == "reasoning" for r in recs)
    n_lost = sum(lost.values())
    m[f"{name}.reasoning_records"] = n_reasoning
    m[f"{name}.cot_lost"] = n_lost
    m[f"{name}.cot_lost_share"] = round(n_lost / n_reasoning if n_reasoning else 0.0, 4)
    m[f"{name}.cot_emptied"] = lost["emptied"]
    for k, v in _keep_stats(kept_shares).items():
        m[f"{name}.cot_keep_share_{k}"] = v
    problems: list[str] = []  # every contract breach of the stage, raised together below
    if (n_lost / n_reasoning if n_reasoning else 0.0) > cfg.max_cot_loss_share:
        below = (
            f"below data.min_cot_tokens={cfg.min_cot_tokens} or data.min_cot_keep_share={cfg.min_cot_keep_share:g}"
            if cfg.overlong == "truncate"
            else "(data.overlong=drop)"
        )
        lower = (
            ", or lower data.min_cot_tokens or data.min_cot_keep_share"
            if cfg.overlong == "truncate"
            else ", or set data.overlong=truncate"
        )
        emptied = f", {lost['emptied']} kept with an emptied CoT" if lost["emptied"] else ""
        question = f"{lost['question']} because the question alone is too long, " if lost["question"] else ""
        problems.append(
            f"data.{name}: {n_lost} of {n_reasoning} reasoning records ({percent(n_lost, n_reasoning)}) would lose "
            f"their CoT at model.max_seq_length={max_len} ({question}{lost['answer']} because the answer would be "
            f"cut, {lost['cot']} because the CoT would be cut {below}{emptied}), more than "
            f"data.max_cot_loss_share={cfg.max_cot_loss_share:g}; raise model.max_seq_length or "
            f"data.max_cot_loss_share{lower}"
        )

    # Contract for every source and task: records lost (incomplete, not text, eval overlap, length,
    # emptied CoT) are logged; more than max_loss_share of them fail the stage, and so does a source left
    # with none. Every breach of the stage is named in one error.
    n_out = Counter(r.source for r in fitted)
    for src in scfg.sources:
        pairs = src.task == "translation" and scfg.translation_direction == "both"
        loss = SourceLoss(name, src, by_src[src.name], 2 if pairs else 1, max_len, cfg, skipped[src.name])
        m[f"{name}.records_offered.{src.name}"] = loss.offered
        m[f"{name}.records_lost.{src.name}"] = loss.lost
        m[f"{name}.loss_share.{src.name}"] = round(loss.share, 4)
        if not n_out[src.name]:
            if not src.allow_empty:
                problems.append(loss.empty()[:-1])
                continue
            log.warning("%s", loss.empty())
        elif loss.share > cfg.max_loss_share:
            problems.append(loss.too_many()[:-1])
        elif loss.lost:
            log.warning("%s", loss.logged())
    if problems:
        raise StageError(_one_sentence(f"data.{name}", problems))

    # Split by a hash of the normalised question; weight > 1 repeats records in train only.
    train: list[dict[str, Any]] = []
    val: list[dict[str, Any]] = []
    out_by_src: Counter[str] = Counter()
    repeated = 0
    for r in fitted:
        d = _as_dict(r)
        out_by_src[r.source] += 1
        if _unit_hash(str(cfg.seed), "split", r.key) < cfg.val_fraction:
            val.append(d)
            continue
        w = weights[r.source]
        copies = 1
        if w > 1:
            copies = int(w) + (1 if _unit_hash(str(cfg.seed), "repeat", r.id) < w - int(w) else 0)
        train.extend([d] * copies)
        repeated += copies - 1

    if train and not val:
        log.warning(
            "%s: no record fell into val (val_fraction %g of %d records)", name, cfg.val_fraction, len(fitted)
        )
    for src in scfg.sources:
        m[f"{name}.rows_out.{src.name}"] = out_by_src[src.name]
        by_src[src.name]["records_out"] = out_by_src[src.name]
    for k, v in drops.items():
        m[f"{name}.dropped.{k}"] = v
    m[f"{name}.truncated"] = truncated
    m[f"{name}.repeated"] = repeated
    m[f"{name}.pii_masked"] = sum(pii.values())
    for k, v in pii.items():
        m[f"{name}.pii.{k}"] = v
    m[f"{name}.train_rows"] = len(train)
    m[f"{name}.val_rows"] = len(val)
    langs = Counter(detect_lang(r.question) for r in fitted)
    m[f"{name}.lang.ko"] = langs["ko"]
    m[f"{name}.lang.en"] = langs["en"]
    for k, v in _percentiles([r.n_tokens for r in fitted]).items():
        m[f"{name}.tokens_{k}"] = v
    for k, v in _percentiles([r.n_prompt for r in fitted]).items():
        m[f"{name}.prompt_tokens_{k}"] = v

    # Debug samples: the first two records of each source, and the first truncated one.
    samples: list[tuple[str, dict[str, Any]]] = []
    for src in scfg.sources:
        samples += [("", _as_dict(r)) for r in [r for r in fitted if r.source == src.name][:2]]
    cut_rec = next((r for r in fitted if r.truncated), None)
    if cut_rec is not None:
        samples.append(("truncated to fit max_seq_length", _as_dict(cut_rec)))
    return StageData(train, val, m, samples, by_src)


# --------------------------------------------------------------------------- the whole stage


@dataclass
class Built:
    """Everything preprocess writes: `files` are paths relative to data/processed."""

    files: dict[str, list[dict[str, Any]]]
    metrics: dict[str, Any]
    samples: dict[str, list[tuple[str, dict[str, Any]]]]
    by_source: dict[str, dict[str, Counter[str]]]


STAGES = ("stage1", "stage2")


def build_datasets(params: Params, tokenizer: Any, root: Path) -> Built:
    """The preprocess stage without its I/O: eval sets, then each SFT stage kept apart from them."""
    cfg = params.data
    root = Path(root).resolve()
    ev = build_eval(cfg, root)
    metrics: dict[str, Any] = dict(ev.metrics)
    files: dict[str, list[dict[str, Any]]] = {"eval/mcq.jsonl": ev.mcq, "eval/koen.jsonl": ev.koen}
    samples: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    by_source: dict[str, dict[str, Counter[str]]] = {}
    overlap = 0
    for name in STAGES:
        sd = build_stage(name, getattr(cfg, name), cfg, tokenizer, params.model.max_seq_length, root, ev.keys)
        files[f"{name}/train.jsonl"] = sd.train
        files[f"{name}/val.jsonl"] = sd.val
        metrics.update(sd.metrics)
        samples[name] = sd.samples
        by_source[name] = sd.by_source
        overlap += sd.metrics[f"{name}.dropped.eval_overlap"]
    metrics["eval.overlap_removed"] = overlap
    metrics["stage2.replay_rows"] = replay_stage1(files, cfg.stage2_replay, cfg.seed) if cfg.stage2_replay else 0
    metrics["stage2.train_rows"] = len(files["stage2/train.jsonl"])
    metrics["max_seq_length"] = params.model.max_seq_length
    return Built(files, metrics, samples, by_source)


def write_outputs(built: Built, out_dir: Path) -> None:
    for rel, rows in sorted(built.files.items()):
        write_jsonl(out_dir / rel, rows)


# --------------------------------------------------------------------------- reports


def data_report(params: Params, built: Built) -> str:
    """reports/data_report.md: rows in/out per source, drops by reason, token lengths, PII counts."""
    cfg = params.data
    metrics = built.metrics
    L = [
        "# Data report",
        "",
        f"Token lengths are the base tokenizer's, against model.max_seq_length = {params.model.max_seq_length}; "
        f"overlong = {cfg.overlong}, min_cot_tokens = {cfg.min_cot_tokens}, "
        f"min_cot_keep_share = {cfg.min_cot_keep_share:g}, max_cot_loss_share = {cfg.max_cot_loss_share:g}, "
        f"max_loss_share = {cfg.max_loss_share:g}, pii = {cfg.pii}, val_fraction = {cfg.val_fraction}, "
        f"think_for_non_reasoning = {cfg.think_for_non_reasoning}, stage2_replay = {cfg.stage2_replay:g} "
        f"({metrics.get('stage2.replay_rows', 0)} stage-1 training records added to stage 2's train split). "
        "An answer is never cut: a record whose "
        "prompt and whole answer do not fit is dropped.",
        "",
    ]
    max_len = params.model.max_seq_length
    cot_why = (
        f"the CoT would keep fewer than data.min_cot_tokens = {cfg.min_cot_tokens} tokens or less than "
        f"data.min_cot_keep_share = {cfg.min_cot_keep_share:g} of them"
        if cfg.overlong == "truncate"
        else "the CoT would have to be cut (overlong = drop)"
    )
    for name in STAGES:
        scfg: StageDataCfg = getattr(cfg, name)
        g = lambda k, name=name: metrics.get(f"{name}.{k}", 0)  # noqa: E731
        by = built.by_source.get(name, {})
        L += [
            f"## {name}",
            "",
            "Rows are source rows; records are training examples (a translation pair gives one per direction).",
            "",
            "| source | task | kind | weight | rows in | blank | empty required cell | not text | duplicate "
            "| equals eval item | subsampled | over length: question alone | over length: answer would be cut "
            "| over length: CoT too short | CoT shortened (kept) | records out |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in scfg.sources:
            c = by.get(s.name, Counter())
            L.append(
                f"| {s.name} | {s.task} | {s.kind} | {s.weight:g} | {c['rows_in']} | {c['blank']} | {c['incomplete']} "
                f"| {c['non_text']} | {c['duplicate']} | {c['eval_overlap']} | {c['subsampled']} "
                f"| {c['overlong_question']} | {c['overlong_answer']} | {c['overlong_cot']} "
                f"| {c['truncated']} | {c['records_out']} |"
            )
        L += [
            "",
            "Blank rows (every mapped column empty) are skipped and are not a loss. Loss per source, in records: "
            "rows with an empty required cell or a non-text value, rows equal to an eval item, records over "
            "length and emptied CoTs (duplicates and weight < 1 are not losses). The stage fails when a source loses "
            f"more than data.max_loss_share = {cfg.max_loss_share:g} of what it offers, or ends "
            "with no records unless it sets allow_empty.",
            "",
            "| source | records offered | lost | share |",
            "|---|---:|---:|---:|",
        ]
        for s in scfg.sources:
            off, lost = g(f"records_offered.{s.name}"), g(f"records_lost.{s.name}")
            L.append(f"| {s.name} | {off} | {lost} | {percent(lost, off)} |")
        L += [
            "",
            f"Records: **{g('train_rows')} train**, **{g('val_rows')} val** ({g('repeated')} of the train "
            f"records are repeats from weights > 1; translation direction {scfg.translation_direction}). "
            f"Question language: {g('lang.ko')} ko, {g('lang.en')} en.",
            "",
            "| dropped because | count |",
            "|---|---:|",
        ]
        for reason, what in (
            ("incomplete", "row with an empty required cell"),
            ("non_text", "row with a non-text value (data.non_text=count)"),
            ("duplicate", "duplicate row (exact + normalised)"),
            ("eval_overlap", "row equals an eval item"),
            ("subsampled", "row left out by weight < 1"),
            ("overlong_question", f"record over {max_len} tokens by the question alone"),
            ("overlong_answer", f"record over {max_len} tokens: the answer would be cut"),
            ("overlong_cot", f"record over {max_len} tokens: {cot_why}"),
        ):
            L.append(f"| {what} | {g('dropped.' + reason)} |")
        L += [
            f"| *record over {max_len} tokens kept with its CoT shortened* | {g('truncated')} |",
            "",
            f"Reasoning records that lost their CoT to the length limit (dropped): {g('cot_lost')} of "
            f"{g('reasoning_records')} ({percent(g('cot_lost'), g('reasoning_records'))}); the stage fails above "
            f"data.max_cot_loss_share = {cfg.max_cot_loss_share:g}.",
            "",
            (
                f"CoT tokens kept by the {g('truncated')} records shortened to fit: mean "
                f"{percent(g('cot_keep_share_mean'), 1)}, p10 {percent(g('cot_keep_share_p10'), 1)}, min "
                f"{percent(g('cot_keep_share_min'), 1)}"
                + (f" ({g('cot_emptied')} emptied, counted as CoT lost)" if g("cot_emptied") else "")
                + f"; data.min_cot_keep_share = {cfg.min_cot_keep_share:g} drops a record below it."
                if g("truncated")
                else "No CoT was shortened."
            ),
            "",
            f"Duplicates: {g('duplicates.exact')} exact, {g('duplicates.normalized')} equal only after normalisation.",
            "",
            "| tokens | p50 | p90 | p99 | max |",
            "|---|---:|---:|---:|---:|",
            f"| prompt + completion | {g('tokens_p50')} | {g('tokens_p90')} | {g('tokens_p99')} | {g('tokens_max')} |",
            f"| prompt (masked) | {g('prompt_tokens_p50')} | {g('prompt_tokens_p90')} | {g('prompt_tokens_p99')} | {g('prompt_tokens_max')} |",
            "",
            f"PII masked: {g('pii_masked')} ({g('pii.rrn')} resident registration numbers, {g('pii.phone')} phone numbers).",
            "",
        ]
    L += [
        "## eval",
        "",
        "| set | source | rows in | blank | empty required cell | not text | rows out |",
        "|---|---|---:|---:|---:|---:|---:|",
        *(
            f"| mcq | {s.name} | {_eval_counts(metrics, s.name)} "
            f"| {sum(r['source'] == s.name for r in built.files.get('eval/mcq.jsonl', []))} |"
            for s in cfg.eval.mcq_sources
        ),
        f"| koen | {cfg.eval.koen.name} | {_eval_counts(metrics, cfg.eval.koen.name)} | {metrics.get('eval.koen_rows', 0)} |",
        "",
        f"Duplicates dropped: {metrics.get('eval.dropped.duplicate', 0)} (mcq: "
        f"{metrics.get('eval.mcq_duplicates.exact', 0)} exact, {metrics.get('eval.mcq_duplicates.normalized', 0)} "
        f"equal after normalisation, {metrics.get('eval.mcq_duplicates.answer_format', 0)} the same answer written "
        f"another way, e.g. B and 2; koen: {metrics.get('eval.koen_duplicates.exact', 0)} exact, "
        f"{metrics.get('eval.koen_duplicates.normalized', 0)} equal after normalisation). "
        f"PII masked: {metrics.get('eval.pii_masked', 0)}. "
        f"Training rows removed for equalling an eval item: {metrics.get('eval.overlap_removed', 0)}.",
        "",
    ]
    return "\n".join(L)


def _eval_counts(metrics: dict[str, Any], name: str) -> str:
    """An eval source's 'rows in | blank | empty required cell | not text' cells."""
    return " | ".join(
        str(metrics.get(f"eval.{k}.{name}", 0)) for k in ("rows_in", "blank", "incomplete", "non_text")
    )


def _fence(text: str) -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}text\n{text}\n{ticks}"


def debug_samples(samples: dict[str, list[tuple[str, dict[str, Any]]]], eos: str) -> str:
    """reports/debug_samples.md: rendered examples with the masked prompt and trained completion marked."""
    L = [
        "# Debug samples",
        "",
        "Each example is exactly what training sees, split at the loss boundary. The quoted **MASKED** "
        "part (the prompt) gets no loss; the **TRAINED** part (the completion, `<think>` block and "
        f"EOS `{eos}` included) does. Each block's text starts on the line after its opening fence "
        "and ends just before its closing fence (the prompt's final newline shows as an empty line).",
        "",
    ]
    for name, rows in samples.items():
        L += [f"## {name}", ""]
        if not rows:
            L += ["(no records)", ""]
        for note, d in rows:
            extra = f" · **{note}**" if note else ""
            L += [
                f"### {d['source']} · {d['task']} · {d['lang']} · `{d['id']}`{extra}",
                "",
                f"{d['n_prompt_tokens']} prompt tokens, {d['n_tokens']} in all.",
                "",
                "> **MASKED** (prompt, no loss)",
                ">",
            ]
            L += ["> " + line if line else ">" for line in _fence(d["prompt"]).split("\n")]
            L += ["", "**TRAINED** (completion, loss incl. EOS)", "", _fence(d["completion"]), ""]
    return "\n".join(L)

"""Unit tests of kmed/data.py and the preprocess stage: every input contract, the exact training
format, the split and overlap guarantees, PII handling, length limits and determinism.

Fixtures are tiny files written into tmp_path by the tests themselves; the tokenizer is the real
embedded SmolLM2 one (offline).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from kmed import data as D
from kmed.config import Params, SourceCfg
from kmed.io import StageError

SYSTEM = "You are a medical expert."
EOS = "<|im_end|>"


# --------------------------------------------------------------------------- fixture builders


def wjsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def wcsv(path: Path, header: list[str], rows: list[list[Any]], encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


def wxlsx(path: Path, sheets: dict[str, list[list[Any]]]) -> Path:
    import openpyxl

    path.parent.mkdir(parents=True, exist_ok=True)
    wb = openpyxl.Workbook()
    wb.remove(wb.active)
    for name, rows in sheets.items():
        ws = wb.create_sheet(name)
        for r in rows:
            ws.append(r)
    wb.save(path)
    return path


MCQ_HEADER = ["subject", "year", "question", "A", "B", "C", "D", "E", "answer"]
MCQ_FIELDS = {f: f for f in ("question", "A", "B", "C", "D", "E", "answer")}
MCQ_ROWS = [
    [
        "doctor",
        2022,
        "급성 충수염의 특징적 압통점은?",
        "맥버니점",
        "머피징후",
        "로브싱징후",
        "쿠르보아지에",
        "그레이터너",
        1,
    ],
    ["doctor", 2022, "갑상선 수질암의 종양표지자는?", "티로글로불린", "CA 19-9", "칼시토닌", "AFP", "", "C"],
]
KOEN_ROWS = [
    {"ko": "기침이 3주 넘게 멈추지 않아요.", "en": "My cough hasn't stopped for more than three weeks."}
]


def reasoning_rows(n: int, prefix: str = "Question") -> list[dict[str, str]]:
    return [
        {
            "Question": f"{prefix} {i}: what is the diagnosis?",
            "Complex_CoT": f"Think about case {i}.",
            "Response": f"Answer {i}.",
        }
        for i in range(n)
    ]


def src(name: str, kind: str, path: str, task: str, fields: dict[str, str], **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "path": path, "task": task, "fields": fields, **kw}


R_FIELDS = {"question": "Question", "cot": "Complex_CoT", "answer": "Response"}
I_FIELDS = {"instruction": "instruction", "input": "input", "output": "output"}
T_FIELDS = {"ko": "원문", "en": "번역문"}


def make_params(
    root: Path,
    stage1: list[dict[str, Any]] | None = None,
    stage2: list[dict[str, Any]] | None = None,
    max_seq_length: int = 384,
    mcq: dict[str, Any] | None = None,
    koen: dict[str, Any] | None = None,
    direction: str = "both",
    **data: Any,
) -> Params:
    """Params whose sources live under `root`; the eval sets default to tiny valid files."""
    if mcq is None:
        wcsv(root / "ev/mcq.csv", MCQ_HEADER, MCQ_ROWS)
        mcq = src("mcq", "csv", "ev/mcq.csv", "mcq", MCQ_FIELDS)
    if koen is None:
        wjsonl(root / "ev/koen.jsonl", KOEN_ROWS)
        koen = src("koen", "jsonl", "ev/koen.jsonl", "pairs", {"ko": "ko", "en": "en"})
    if stage1 is None:
        wjsonl(root / "s1.jsonl", reasoning_rows(3))
        stage1 = [src("s1", "jsonl", "s1.jsonl", "reasoning", R_FIELDS)]
    if stage2 is None:
        wjsonl(
            root / "s2.jsonl",
            [{"instruction": "혈압을 낮추는 방법은?", "input": "", "output": "싱겁게 드세요."}],
        )
        stage2 = [src("s2", "jsonl", "s2.jsonl", "instruction", I_FIELDS)]
    raw = {
        "model": {"max_seq_length": max_seq_length},
        "data": {
            "system_prompt": SYSTEM,
            "stage1": {"sources": stage1},
            "stage2": {"sources": stage2, "translation_direction": direction},
            "eval": {"mcq": mcq, "koen": koen},
            **data,
        },
    }
    return Params.model_validate(raw)


def one_source(root: Path, kind: str, path: str, task: str, fields: dict[str, str], **kw: Any) -> SourceCfg:
    return SourceCfg.model_validate(src("x", kind, path, task, fields, **kw))


def read(root: Path, s: SourceCfg, max_mb: float = 50) -> list[D.Row]:
    return D.read_source(s, root, max_mb)[0]


def error_of(fn: Any, *a: Any, **kw: Any) -> str:
    with pytest.raises(StageError) as ei:
        fn(*a, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and msg.endswith("."), f"not one sentence: {msg!r}"
    return msg


# --------------------------------------------------------------------------- rendering


def test_render_prompt_exact() -> None:
    assert D.render_prompt("SYS", "Q?") == "### Instruction:\nSYS\n\n### Question:\nQ?\n\n### Response:\n"


def test_render_completion_exact() -> None:
    assert D.render_completion("c", "a", "<E>") == "<think>\nc\n</think>\na<E>"
    assert D.render_completion("", "a", "<E>") == "<think>\n\n</think>\na<E>"
    assert D.render_completion(None, "a", "<E>") == "a<E>"


def test_instruction_and_translation_rendering(tmp_path: Path, smol_tokenizer: Any) -> None:
    wjsonl(
        tmp_path / "i.jsonl",
        [
            {"instruction": "요약하세요.", "input": "긴 글", "output": "짧은 글"},
            {"instruction": "인사하세요.", "input": "", "output": "안녕하세요"},
        ],
    )
    wxlsx(
        tmp_path / "t.xlsx", {"S": [["ID", "원문", "번역문"], ["1", "머리가 아파요.", "I have a headache."]]}
    )
    p = make_params(
        tmp_path,
        stage2=[
            src("i", "jsonl", "i.jsonl", "instruction", I_FIELDS),
            src("t", "xlsx", "t.xlsx", "translation", T_FIELDS),
        ],
        val_fraction=0.01,
    )
    out = D.build_datasets(p, smol_tokenizer, tmp_path).files
    recs = out["stage2/train.jsonl"] + out["stage2/val.jsonl"]
    by_prompt = {r["prompt"]: r for r in recs}
    q = D.render_prompt(SYSTEM, "요약하세요.\n\n긴 글")
    assert by_prompt[q]["completion"] == "<think>\n\n</think>\n짧은 글" + EOS
    assert D.render_prompt(SYSTEM, "인사하세요.") in by_prompt
    ko2en = by_prompt[D.render_prompt(SYSTEM, "다음 한국어 문장을 영어로 번역하세요.\n\n머리가 아파요.")]
    en2ko = by_prompt[
        D.render_prompt(SYSTEM, "Translate the following English sentence into Korean.\n\nI have a headache.")
    ]
    assert ko2en["completion"] == "<think>\n\n</think>\nI have a headache." + EOS and ko2en["lang"] == "ko"
    assert en2ko["completion"] == "<think>\n\n</think>\n머리가 아파요." + EOS and en2ko["lang"] == "en"
    assert len(recs) == 4 and {r["task"] for r in recs} == {"instruction", "translation"}
    for r in recs:
        assert r["n_prompt_tokens"] == len(smol_tokenizer(r["prompt"])["input_ids"])
        assert r["n_tokens"] == len(smol_tokenizer(r["prompt"] + r["completion"])["input_ids"])

    p1 = make_params(
        tmp_path,
        stage2=[src("t", "xlsx", "t.xlsx", "translation", T_FIELDS)],
        direction="ko2en",
        think_for_non_reasoning="none",
    )
    out1 = D.build_datasets(p1, smol_tokenizer, tmp_path).files
    recs1 = out1["stage2/train.jsonl"] + out1["stage2/val.jsonl"]
    assert [r["completion"] for r in recs1] == ["I have a headache." + EOS]


def test_normalize_text() -> None:
    assert D.normalize_text("  a\u3000\t b  \r\n\n   c  ") == "a b\n\n c"  # indentation kept as one space
    nfd = "\u1100\u1161"  # 가 decomposed
    assert D.normalize_text(nfd) == "가"


# --------------------------------------------------------------------------- encodings


def test_cp949_csv_is_decoded(tmp_path: Path) -> None:
    wcsv(tmp_path / "m.csv", MCQ_HEADER, MCQ_ROWS, encoding="cp949")
    with pytest.raises(UnicodeDecodeError):
        (tmp_path / "m.csv").read_bytes().decode("utf-8")
    rows = read(tmp_path, one_source(tmp_path, "csv", "m.csv", "mcq", MCQ_FIELDS))
    assert rows[0].values["question"] == "급성 충수염의 특징적 압통점은?"
    assert rows[1].values["C"] == "칼시토닌" and rows[1].values["answer"] == "C"


def test_bom_csv_and_bom_jsonl(tmp_path: Path) -> None:
    wcsv(tmp_path / "m.csv", MCQ_HEADER, MCQ_ROWS, encoding="utf-8-sig")
    rows = read(tmp_path, one_source(tmp_path, "csv", "m.csv", "mcq", {**MCQ_FIELDS}))
    assert len(rows) == 2 and rows[0].n == 2  # header is row 1, so "subject" was found despite the BOM
    (tmp_path / "r.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(reasoning_rows(1)[0]).encode())
    assert (
        read(tmp_path, one_source(tmp_path, "jsonl", "r.jsonl", "reasoning", R_FIELDS))[0].values["answer"]
        == "Answer 0."
    )


def test_cp949_jsonl_is_decoded(tmp_path: Path) -> None:
    line = json.dumps({"ko": "두통", "en": "headache"}, ensure_ascii=False) + "\n"
    (tmp_path / "p.jsonl").write_bytes(line.encode("cp949"))
    assert read(tmp_path, one_source(tmp_path, "jsonl", "p.jsonl", "pairs", {}))[0].values["ko"] == "두통"


def test_undecodable_bytes_name_file_and_offset(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_bytes(b"ko,en\nab,\xff\x80\n")
    msg = error_of(read, tmp_path, one_source(tmp_path, "csv", "bad.csv", "pairs", {}))
    assert msg == "bad.csv: cannot decode the text as UTF-8 or CP949 (first bad byte 0xff at byte offset 9)."


def test_corrupt_utf8_korean_is_not_misread_as_cp949(tmp_path: Path) -> None:
    good = "ko,en\n두통,headache\n".encode()
    (tmp_path / "c.csv").write_bytes(good + b"\xb0\xa1,x\n")  # 가 in CP949 after UTF-8 Korean
    msg = error_of(read, tmp_path, one_source(tmp_path, "csv", "c.csv", "pairs", {}))
    assert f"byte offset {len(good)}" in msg and msg.startswith("c.csv:")


# --------------------------------------------------------------------------- columns, cells, files


def test_xlsx_renamed_columns_lists_all_missing(tmp_path: Path) -> None:
    wxlsx(tmp_path / "x.xlsx", {"Sheet1": [["ID", "Korean", "English"], ["1", "a", "b"]]})
    msg = error_of(read, tmp_path, one_source(tmp_path, "xlsx", "x.xlsx", "translation", T_FIELDS))
    assert (
        msg == "x.xlsx sheet 'Sheet1': missing columns '원문', '번역문' (found: 'ID', 'Korean', 'English')."
    )


def test_csv_and_jsonl_missing_columns(tmp_path: Path) -> None:
    wcsv(tmp_path / "m.csv", ["question", "A", "B", "C", "E", "answer"], [["q", "1", "2", "3", "5", "A"]])
    msg = error_of(read, tmp_path, one_source(tmp_path, "csv", "m.csv", "mcq", MCQ_FIELDS))
    assert msg == "m.csv: missing column 'D' (found: 'question', 'A', 'B', 'C', 'E', 'answer')."
    wjsonl(tmp_path / "r.jsonl", reasoning_rows(1) + [{"question": "q", "cot": "c", "Response": "r"}])
    msg = error_of(read, tmp_path, one_source(tmp_path, "jsonl", "r.jsonl", "reasoning", R_FIELDS))
    assert (
        msg
        == "r.jsonl line 2: missing columns 'Question', 'Complex_CoT' (found: 'question', 'cot', 'Response')."
    )


def test_unmapped_field_with_a_case_variant_is_refused(tmp_path: Path) -> None:
    # medical-o1: `question` is the source MCQ stem, `Question` the question the CoT answers.
    rec = {"question": "stem", "Question": "rewritten", "Complex_CoT": "c", "Response": "r"}
    (tmp_path / "m.json").write_text(json.dumps([rec, rec]), encoding="utf-8")
    partial = {"cot": "Complex_CoT", "answer": "Response"}
    msg = error_of(read, tmp_path, one_source(tmp_path, "json", "m.json", "reasoning", partial))
    assert msg == (
        "m.json record 1: fields does not map 'question', so it would read the column 'question', but the "
        "file also has 'Question'; map it explicitly (fields: {question: Question} or {question: question})."
    )
    for q in ("Question", "question"):  # either explicit choice is read as asked
        rows = read(tmp_path, one_source(tmp_path, "json", "m.json", "reasoning", {**partial, "question": q}))
        assert rows[0].values["question"] == rec[q]
    # An optional field: `Input` must not be skipped silently because `input` is absent.
    wcsv(tmp_path / "i.csv", ["instruction", "Input", "output"], [["a", "b", "c"]])
    msg = error_of(read, tmp_path, one_source(tmp_path, "csv", "i.csv", "instruction", {}))
    assert msg.startswith(
        "i.csv: fields does not map 'input', so it would read the column 'input', but the file lacks it but has "
        "'Input'; map it explicitly"
    )


def test_xlsx_formula_without_cached_value_names_cell(tmp_path: Path) -> None:
    wxlsx(
        tmp_path / "f.xlsx",
        {"S": [["ID", "원문", "번역문"], ["1", "두통", "headache"], ["2", "기침", '=B3&"x"']]},
    )
    msg = error_of(read, tmp_path, one_source(tmp_path, "xlsx", "f.xlsx", "translation", T_FIELDS))
    assert msg.startswith("f.xlsx sheet 'S' cell C3: formula '=B3&\"x\"' has no cached value")


def test_xlsx_bomb_refused_before_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import openpyxl

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("openpyxl must not be reached")

    monkeypatch.setattr(openpyxl, "load_workbook", boom)
    bomb = tmp_path / "bomb.xlsx"
    with (
        zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf,
        zf.open("xl/worksheets/sheet1.xml", "w") as fh,
    ):
        chunk = b"\0" * (1 << 20)
        for _ in range(64):
            fh.write(chunk)
    assert bomb.stat().st_size < 1 << 20
    s = one_source(tmp_path, "xlsx", "bomb.xlsx", "translation", T_FIELDS)
    t = time.perf_counter()
    msg = error_of(read, tmp_path, s, 50)
    assert time.perf_counter() - t < 1.0
    assert msg == "bomb.xlsx: uncompressed size 64.0 MB exceeds data.max_xlsx_mb=50; refusing to open it."
    msg = error_of(read, tmp_path, s, 100)
    assert msg.startswith("bomb.xlsx: compression ratio ") and "exceeds 100:1" in msg


def test_header_only_and_empty_sheets(tmp_path: Path) -> None:
    wxlsx(
        tmp_path / "h.xlsx",
        {"A": [["ID", "원문", "번역문"], ["1", "두통", "headache"]], "B": [["ID", "원문", "번역문"]]},
    )
    msg = error_of(read, tmp_path, one_source(tmp_path, "xlsx", "h.xlsx", "translation", T_FIELDS))
    assert msg == "h.xlsx sheet 'B': has a header row but no data rows."
    wcsv(tmp_path / "h.csv", ["ko", "en"], [])
    assert error_of(read, tmp_path, one_source(tmp_path, "csv", "h.csv", "pairs", {})) == (
        "h.csv: has a header row but no data rows."
    )


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "xlsx", "parquet"])
def test_empty_file(tmp_path: Path, kind: str) -> None:
    (tmp_path / f"e.{kind}").write_bytes(b"" if kind != "jsonl" else b"\n  \n")
    msg = error_of(read, tmp_path, one_source(tmp_path, kind, f"e.{kind}", "pairs", {}))
    assert msg == f"e.{kind}: the file is empty."


def test_wrong_sheet_name_and_selected_sheet(tmp_path: Path) -> None:
    wxlsx(
        tmp_path / "w.xlsx",
        {"daily": [["원문", "번역문"], ["안녕", "hi"]], "med": [["원문", "번역문"], ["두통", "headache"]]},
    )
    msg = error_of(
        read, tmp_path, one_source(tmp_path, "xlsx", "w.xlsx", "translation", T_FIELDS, sheet="Sheet1")
    )
    assert msg == "w.xlsx: there is no sheet named 'Sheet1' (sheets: 'daily', 'med')."
    rows = read(tmp_path, one_source(tmp_path, "xlsx", "w.xlsx", "translation", T_FIELDS, sheet="med"))
    assert [r.values["ko"] for r in rows] == ["두통"]


def test_xlsx_description_sheet_error_names_the_sheet_param(tmp_path: Path) -> None:
    wxlsx(
        tmp_path / "a.xlsx",
        {"설명": [["이 파일은 한영 말뭉치입니다."]], "Sheet1": [["원문", "번역문"], ["두통", "headache"]]},
    )
    msg = error_of(read, tmp_path, one_source(tmp_path, "xlsx", "a.xlsx", "translation", T_FIELDS))
    assert msg == (
        "a.xlsx sheet '설명': missing columns '원문', '번역문' (found: '이 파일은 한영 말뭉치입니다.'); set sheet: "
        "on source 'x' to the sheet that holds them (sheets: '설명', 'Sheet1')."
    )
    rows = read(tmp_path, one_source(tmp_path, "xlsx", "a.xlsx", "translation", T_FIELDS, sheet="Sheet1"))
    assert [r.values["en"] for r in rows] == ["headache"]


def test_xlsx_folder_reads_all_files_and_sheets_in_order(tmp_path: Path) -> None:
    wxlsx(tmp_path / "d/b.xlsx", {"S1": [["원문", "번역문"], ["셋", "three"]]})
    wxlsx(
        tmp_path / "d/a.xlsx",
        {
            "S1": [["원문", "번역문"], ["하나", "one"], [None, None]],
            "S2": [["번역문", "원문", "extra"], ["two", "둘", 1]],
        },
    )
    (tmp_path / "d/~$a.xlsx").write_bytes(b"lock")  # Excel's owner file: not a workbook, skipped
    rows, skipped = D.read_source(one_source(tmp_path, "xlsx", "d", "translation", T_FIELDS), tmp_path, 50)
    assert [r.values["ko"] for r in rows] == ["하나", "둘", "셋"]
    assert skipped.blank == 1 and rows[1].where == "d/a.xlsx sheet 'S2'" and rows[1].n == 2


def test_malformed_jsonl_line(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"ko": "a", "en": "b"}\n\n{"ko": "c", "en": }\n', encoding="utf-8")
    msg = error_of(read, tmp_path, one_source(tmp_path, "jsonl", "m.jsonl", "pairs", {}))
    assert msg.startswith("m.jsonl line 3: malformed JSON (")


# --------------------------------------------------------------------------- JSON layouts


def test_json_array_object_and_lines_are_read_by_either_kind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The published layouts: a (pretty-printed) JSON array, an object holding the records under a key
    (found alone or named by records_key), JSON Lines; the layout comes from the content, not the kind."""
    rows = reasoning_rows(3)
    array = json.dumps(rows, ensure_ascii=False, indent=2)
    (tmp_path / "a.json").write_text(array, encoding="utf-8")
    (tmp_path / "a.jsonl").write_text(array, encoding="utf-8")  # an array behind a .jsonl name
    (tmp_path / "o.json").write_text(json.dumps({"version": "1.0", "data": rows}, indent=1), encoding="utf-8")
    (tmp_path / "o.jsonl").write_text(json.dumps({"data": rows}), encoding="utf-8")  # one line, a document
    (tmp_path / "s.json").write_text(json.dumps({"train": rows, "test": rows[:1]}), encoding="utf-8")
    wjsonl(tmp_path / "l.json", rows)  # JSON Lines behind a .json name
    want = [r["Question"] for r in rows]
    caplog.set_level("INFO", logger="kmed.data")
    for kind, path, kw, unit in (
        ("json", "a.json", {}, "record"),
        ("jsonl", "a.jsonl", {}, "record"),
        ("json", "o.json", {}, "record"),
        ("jsonl", "o.jsonl", {}, "record"),
        ("json", "s.json", {"records_key": "train"}, "record"),
        ("json", "l.json", {}, "line"),
    ):
        got = read(tmp_path, one_source(tmp_path, kind, path, "reasoning", R_FIELDS, **kw))
        assert [r.values["question"] for r in got] == want, path
        assert (got[2].loc(), got[2].file) == (f"{path} {unit} 3", path)
    log = caplog.text
    assert "a.jsonl: a JSON array, not JSON Lines; read as kind json" in log
    assert "o.json: records under the key 'data' (the only list of objects" in log
    assert "s.json: records under the key 'train' (records_key)" in log
    assert "l.json: JSON Lines (one object per line), read line by line" in log
    # A folder source of kind json reads its *.json files (not the .jsonl ones).
    (tmp_path / "d").mkdir()
    for name in ("b.json", "a.json", "x.jsonl"):
        (tmp_path / "d" / name).write_text(array, encoding="utf-8")
    got = read(tmp_path, one_source(tmp_path, "json", "d", "reasoning", R_FIELDS))
    assert [r.file for r in got] == ["d/a.json"] * 3 + ["d/b.json"] * 3


@pytest.mark.parametrize(
    ("kind", "text", "kw", "want"),
    [
        (
            "json",
            '[\n  {"Question": "q",\n  }\n]',
            {},
            "line 3: malformed JSON (Expecting property name enclosed in double quotes at column 3).",
        ),
        (
            "jsonl",
            '[\n  {"Question": "q",\n  }\n]',
            {},
            "line 3: malformed JSON (Expecting property name enclosed in double quotes at column 3).",
        ),
        (
            "jsonl",
            '{\n "data": [\n  {"Question": 1}\n]',
            {},
            "line 4: malformed JSON (Expecting ',' delimiter at column 2).",
        ),
        ("json", "[1, 2]", {}, "record 1: expected a JSON object, got a JSON number."),
        ("json", "[]", {}, ": the JSON array holds no records."),
        ("json", '"text"', {}, ": expected a JSON array of objects, got a JSON string."),
        (
            "json",
            '{"a": 1, "b": [1]}',
            {},
            ": a JSON object with no list of records under any key (keys: 'a', 'b'); give a JSON array or set "
            "records_key on the source.",
        ),
        (
            "json",
            '{"train": [{"a": 1}], "test": [{"a": 2}]}',
            {},
            ": several top-level keys hold lists of records ('train', 'test'); set records_key on the source to pick one.",
        ),
        (
            "json",
            '{"data": [{"a": 1}]}',
            {"records_key": "rows"},
            ": there is no top-level key 'rows' (records_key; keys: 'data').",
        ),
        (
            "json",
            '{"data": "x"}',
            {"records_key": "data"},
            ": key 'data' holds a JSON string, not a list of records.",
        ),
        (
            "json",
            '[{"Question": "q"}]',
            {},
            "record 1: missing columns 'Complex_CoT', 'Response' (found: 'Question').",
        ),
    ],
)
def test_json_errors_name_the_real_problem(tmp_path: Path, kind: str, text: str, kw: dict, want: str) -> None:
    (tmp_path / f"x.{kind}").write_text(text, encoding="utf-8")
    msg = error_of(read, tmp_path, one_source(tmp_path, kind, f"x.{kind}", "reasoning", R_FIELDS, **kw))
    assert msg == f"x.{kind}{'' if want.startswith(':') else ' '}{want}"


def test_new_data_keys_are_validated(tmp_path: Path) -> None:
    from kmed.config import ParamsError, load_params

    root = Path(__file__).resolve().parents[1]
    for mutate, want in (
        (
            lambda d: d["stage1"]["sources"][0].update(kind="csv", records_key="data"),
            "records_key is for kind json",
        ),
        (lambda d: d.update(max_cot_loss_share=1.5), "key 'data.max_cot_loss_share'"),
        (lambda d: d.update(min_cot_tokens=-1), "key 'data.min_cot_tokens'"),
    ):
        raw = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
        mutate(raw["data"])
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
        with pytest.raises(ParamsError, match=want):
            load_params(tmp_path / "params.yaml")


def test_empty_required_cell_is_a_counted_loss_naming_file_row_column(tmp_path: Path) -> None:
    # Partly-null rows follow one rule: left out and counted as incomplete, with their places (the
    # stage's loss contract then decides); a row with every mapped cell empty is blank instead.
    wxlsx(
        tmp_path / "e.xlsx",
        {"S": [["ID", "원문", "번역문"], ["1", "두통", "headache"], ["2", "기침", "  "], ["3", None, None]]},
    )
    rows, sk = D.read_source(one_source(tmp_path, "xlsx", "e.xlsx", "translation", T_FIELDS), tmp_path, 50)
    assert [r.n for r in rows] == [2] and (sk.incomplete, sk.blank, sk.non_text) == (1, 1, 0)
    assert sk.places("incomplete") == "e.xlsx sheet 'S' row 3 (cell C3) column '번역문'"
    wjsonl(
        tmp_path / "i.jsonl",
        [
            {"instruction": "a", "input": "", "output": "b"},
            {"instruction": "c", "input": None, "output": None},
        ],
    )
    rows, sk = D.read_source(one_source(tmp_path, "jsonl", "i.jsonl", "instruction", I_FIELDS), tmp_path, 50)
    assert len(rows) == 1 and sk.places("incomplete") == "i.jsonl line 2 column 'output'"


def test_optional_fields_may_be_absent(tmp_path: Path) -> None:
    wjsonl(tmp_path / "i.jsonl", [{"instruction": "a", "output": "b"}])
    assert (
        read(tmp_path, one_source(tmp_path, "jsonl", "i.jsonl", "instruction", {}))[0].values["input"] == ""
    )


def test_unknown_schema_field_refused(tmp_path: Path) -> None:
    msg = error_of(D.source_fields, one_source(tmp_path, "jsonl", "x", "reasoning", {"questoin": "Q"}))
    assert msg == "source 'x': fields names 'questoin', not in the reasoning schema (question, cot, answer)."


def test_limit_and_glob(tmp_path: Path) -> None:
    wjsonl(tmp_path / "g/b.jsonl", reasoning_rows(3, "B"))
    wjsonl(tmp_path / "g/a.jsonl", reasoning_rows(3, "A"))
    rows = read(tmp_path, one_source(tmp_path, "jsonl", "g/*.jsonl", "reasoning", R_FIELDS, limit=4))
    assert [r.values["question"].split(":")[0] for r in rows] == ["A 0", "A 1", "A 2", "B 0"]


def test_hf_source_loads_a_local_dataset_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    wjsonl(tmp_path / "hub/train.jsonl", reasoning_rows(5))
    s = SourceCfg.model_validate(
        {
            "name": "o1",
            "kind": "hf",
            "hub_id": "hub",
            "revision": "abc123",
            "task": "reasoning",
            "fields": R_FIELDS,
            "limit": 3,
        }
    )
    rows = read(tmp_path, s)
    assert [r.values["answer"] for r in rows] == ["Answer 0.", "Answer 1.", "Answer 2."]
    bad = s.model_copy(update={"fields": {**R_FIELDS, "cot": "CoT"}})
    assert error_of(read, tmp_path, bad) == (
        "hub@abc123 split 'train': missing column 'CoT' (found: 'Question', 'Complex_CoT', 'Response')."
    )


# --------------------------------------------------------------------------- paths


def test_paths_escaping_the_repo_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    wjsonl(tmp_path / "secret.jsonl", reasoning_rows(1))
    for path in ("../secret.jsonl", str(tmp_path / "secret.jsonl")):
        msg = error_of(read, root, one_source(root, "jsonl", path, "reasoning", R_FIELDS))
        assert msg.startswith("source 'x': ") and ("outside" in msg or "escapes" in msg)
        assert path in msg and "refusing it" in msg
    (root / "data").mkdir()
    (root / "data/link.jsonl").symlink_to(tmp_path / "secret.jsonl")
    msg = error_of(read, root, one_source(root, "jsonl", "data/link.jsonl", "reasoning", R_FIELDS))
    assert "resolves outside the repository root" in msg and str(tmp_path / "secret.jsonl") in msg
    msg = error_of(
        read, root, one_source(root, "jsonl", "data", "reasoning", R_FIELDS)
    )  # folder holding the link
    assert "data/link.jsonl resolves outside the repository root" in msg


# --------------------------------------------------------------------------- MCQ


def test_mcq_letter_and_integer_answers(tmp_path: Path, smol_tokenizer: Any) -> None:
    rows = [
        ["q1", "a", "b", "c", "d", "e", "A"],
        ["q2", "a", "b", "c", "d", "e", "3"],
        ["q3", "a", "b", "c", "d", "", " d "],
        ["q4", "a", "b", "c", "d", "e", "5.0"],
        ["q5", "a", "b", "c", "d", "e", "(b)"],
    ]
    wcsv(tmp_path / "m.csv", ["question", "A", "B", "C", "D", "E", "answer"], rows)
    wxlsx(
        tmp_path / "m.xlsx",
        {"S": [["question", "A", "B", "C", "D", "answer"], ["q6", "a", "b", "c", "d", 2]]},
    )
    for path, want in (("m.csv", ["A", "C", "D", "E", "B"]), ("m.xlsx", ["B"])):
        p = make_params(tmp_path, mcq=src("m", path.split(".")[1], path, "mcq", MCQ_FIELDS))
        mcq = D.build_datasets(p, smol_tokenizer, tmp_path).files["eval/mcq.jsonl"]
        assert [m["answer"] for m in mcq] == want
    assert mcq[0]["options"] == {"A": "a", "B": "b", "C": "c", "D": "d"}  # no E column: four options
    assert mcq[0]["file"] == "m.xlsx" and mcq[0]["subject"] == ""  # subject not mapped
    assert set(mcq[0]) == {"id", "source", "file", "subject", "question", "options", "answer"}


@pytest.mark.parametrize(
    ("answer", "why"),
    [("6", "holds '6', not a letter A-E or a number 1-5"), ("E", "names option E, which is empty")],
)
def test_mcq_bad_answer(tmp_path: Path, smol_tokenizer: Any, answer: str, why: str) -> None:
    wcsv(
        tmp_path / "m.csv",
        ["question", "A", "B", "C", "D", "E", "answer"],
        [["q", "a", "b", "c", "d", "", answer]],
    )
    p = make_params(tmp_path, mcq=src("m", "csv", "m.csv", "mcq", MCQ_FIELDS))
    assert error_of(D.build_datasets, p, smol_tokenizer, tmp_path) == f"m.csv row 2: column 'answer' {why}."


def _letter_and_integer_copies(root: Path, n: int = 6) -> list[list[Any]]:
    """KorMedMCQA-style rows written twice into one folder: letter answers, then integer answers."""
    rows = [
        [
            "doctor" if i % 2 else "nurse",
            2023,
            f"{i}번 환자에게 가장 적절한 처치는?",
            "가",
            "나",
            "다",
            "라",
            "마",
            "ABCDE"[i % 5],
        ]
        for i in range(n)
    ]
    wcsv(root / "kmcq/letter.csv", MCQ_HEADER, rows)
    wcsv(root / "kmcq/number.csv", MCQ_HEADER, [[*r[:-1], "ABCDE".index(r[-1]) + 1] for r in rows])
    return rows


def test_mcq_dedup_compares_the_parsed_answer(tmp_path: Path, smol_tokenizer: Any) -> None:
    rows = _letter_and_integer_copies(tmp_path)
    with (tmp_path / "kmcq/letter.csv").open("a", encoding="utf-8") as f:
        csv.writer(f).writerows(
            [rows[0], [*rows[1][:2], "  " + rows[1][2].replace(" ", "   "), *rows[1][3:]]]
        )
    fields = {**MCQ_FIELDS, "subject": "subject"}
    p = make_params(tmp_path, mcq=src("kmcq", "csv", "kmcq", "mcq", fields))
    b = D.build_datasets(p, smol_tokenizer, tmp_path)
    mcq = b.files["eval/mcq.jsonl"]
    assert len(mcq) == 6 and len({m["id"] for m in mcq}) == 6
    assert [m["answer"] for m in mcq] == [r[-1] for r in rows]
    assert {m["file"] for m in mcq} == {"kmcq/letter.csv"} and mcq[1]["subject"] == "doctor"
    m = b.metrics
    assert m["eval.rows_in.kmcq"] == 14 and m["eval.mcq_rows"] == 6
    assert (m["eval.mcq_duplicates.exact"], m["eval.mcq_duplicates.normalized"]) == (1, 1)
    assert m["eval.mcq_duplicates.answer_format"] == 6 and m["eval.dropped.duplicate"] == 8
    report = D.data_report(p, b)
    assert (
        "Duplicates dropped: 8 (mcq: 1 exact, 1 equal after normalisation, 6 the same answer written another way"
        in report
    )


def test_mcq_same_item_with_different_answers_fails_naming_both_rows(
    tmp_path: Path, smol_tokenizer: Any
) -> None:
    rows = _letter_and_integer_copies(tmp_path)
    wcsv(tmp_path / "kmcq/number.csv", MCQ_HEADER, [[*rows[0][:-1], 1], [*rows[1][:-1], 4]])  # B vs D
    p = make_params(tmp_path, mcq=src("kmcq", "csv", "kmcq", "mcq", MCQ_FIELDS))
    assert error_of(D.build_datasets, p, smol_tokenizer, tmp_path) == (
        "kmcq/letter.csv row 3 and kmcq/number.csv row 3: the same question and options with different "
        "answers (B and D)."
    )


def test_mcq_id_takes_part_in_dedup_only_when_mapped(tmp_path: Path, smol_tokenizer: Any) -> None:
    header = ["id", "question", "A", "B", "C", "D", "answer"]
    wcsv(
        tmp_path / "m.csv",
        header,
        [["2022-1", "q", "a", "b", "c", "d", "A"], ["2023-7", "q", "a", "b", "c", "d", 1]],
    )
    fields = {f: f for f in ("question", "A", "B", "C", "D", "answer")}
    p = make_params(tmp_path, mcq=src("m", "csv", "m.csv", "mcq", {**fields, "id": "id"}))
    mcq = D.build_datasets(p, smol_tokenizer, tmp_path).files["eval/mcq.jsonl"]
    assert len(mcq) == 2 and mcq[0]["id"] != mcq[1]["id"]  # two exam items that share their text
    p = make_params(tmp_path, mcq=src("m", "csv", "m.csv", "mcq", fields))  # the id column is not read
    assert len(D.build_datasets(p, smol_tokenizer, tmp_path).files["eval/mcq.jsonl"]) == 1


def test_eval_mcq_accepts_a_list_of_sources(tmp_path: Path, smol_tokenizer: Any) -> None:
    _letter_and_integer_copies(tmp_path)
    fields = {**MCQ_FIELDS, "subject": "subject"}
    lists = [
        src("letters", "csv", "kmcq/letter.csv", "mcq", fields),
        src("numbers", "csv", "kmcq/number.csv", "mcq", fields),
    ]
    b = D.build_datasets(make_params(tmp_path, mcq=lists), smol_tokenizer, tmp_path)
    assert len(b.files["eval/mcq.jsonl"]) == 6  # the two sources are de-duplicated together
    assert (b.metrics["eval.rows_in.letters"], b.metrics["eval.rows_in.numbers"]) == (6, 6)
    report = D.data_report(make_params(tmp_path, mcq=lists), b)
    assert "| mcq | letters | 6 | 0 | 0 | 0 | 6 |" in report
    assert "| mcq | numbers | 6 | 0 | 0 | 0 | 0 |" in report
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="source names must be unique"):
        make_params(tmp_path, mcq=[lists[0], lists[0]])


# --------------------------------------------------------------------------- duplicates, overlap, split


def test_duplicates_and_eval_overlap_removed(tmp_path: Path, smol_tokenizer: Any) -> None:
    base = reasoning_rows(20)
    exact = dict(base[0])
    spaced = {k: "  " + v.replace(" ", "   ") + " " for k, v in base[1].items()}  # same after normalising
    leak_mcq = {"Question": "급성  충수염의 특징적 압통점은?", "Complex_CoT": "c", "Response": "r"}
    wjsonl(tmp_path / "s1.jsonl", [*base, exact, spaced, leak_mcq])
    wxlsx(
        tmp_path / "t.xlsx",
        {
            "S": [
                ["원문", "번역문"],
                ["두통이 있어요.", "I have a headache."],
                ["두통이 있어요.", "I have a headache."],
                ["기침이 3주 넘게 멈추지 않아요.", "My cough won't stop."],
            ]
        },
    )
    p = make_params(
        tmp_path,
        stage1=[src("s1", "jsonl", "s1.jsonl", "reasoning", R_FIELDS)],
        stage2=[src("t", "xlsx", "t.xlsx", "translation", T_FIELDS)],
        val_fraction=0.3,
        max_loss_share=0.5,
    )
    b = D.build_datasets(p, smol_tokenizer, tmp_path)
    m = b.metrics
    assert m["stage1.rows_in.s1"] == 23
    # Duplicates are not losses; an eval item is: t offers 2 distinct pairs (4 records) and loses one pair.
    assert (m["stage1.records_offered.s1"], m["stage1.records_lost.s1"]) == (21, 1)
    assert (m["stage2.records_offered.t"], m["stage2.records_lost.t"], m["stage2.loss_share.t"]) == (
        4,
        2,
        0.5,
    )
    assert (
        m["stage1.duplicates.exact"],
        m["stage1.duplicates.normalized"],
        m["stage1.dropped.duplicate"],
    ) == (1, 1, 2)
    assert m["stage1.dropped.eval_overlap"] == 1 and m["stage2.dropped.eval_overlap"] == 1
    assert m["stage2.dropped.duplicate"] == 1 and m["eval.overlap_removed"] == 2
    assert b.by_source["stage1"]["s1"]["duplicate"] == 2 and b.by_source["stage2"]["t"]["eval_overlap"] == 1
    assert (
        m["stage1.train_rows"] + m["stage1.val_rows"] == 20
        and m["stage2.train_rows"] + m["stage2.val_rows"] == 2
    )

    def questions(rel: str) -> set[str]:
        return {
            D.match_key(r["prompt"].split("### Question:\n")[1].split("\n\n### Response:")[0])
            for r in b.files[rel]
        }

    for s in ("stage1", "stage2"):
        assert not questions(f"{s}/train.jsonl") & questions(f"{s}/val.jsonl")
    assert questions("stage1/val.jsonl")
    evals = {D.match_key(x["question"]) for x in b.files["eval/mcq.jsonl"]}
    assert not (questions("stage1/train.jsonl") | questions("stage1/val.jsonl")) & evals
    stage2_text = "".join(
        r["prompt"] + r["completion"] for r in b.files["stage2/train.jsonl"] + b.files["stage2/val.jsonl"]
    )
    assert "기침" not in stage2_text


def test_split_is_by_question_and_stable(tmp_path: Path, smol_tokenizer: Any) -> None:
    rows = reasoning_rows(40)
    twins = [{**r, "Response": r["Response"] + " (second answer)"} for r in rows[:10]]
    wjsonl(tmp_path / "a.jsonl", rows + twins)
    p = make_params(tmp_path, stage1=[src("a", "jsonl", "a.jsonl", "reasoning", R_FIELDS)], val_fraction=0.3)
    b = D.build_datasets(p, smol_tokenizer, tmp_path)
    val_ids = {r["id"] for r in b.files["stage1/val.jsonl"]}
    assert 0 < len(val_ids) < 50

    def split_of(prompt: str) -> set[str]:
        return {s for s in ("train", "val") for r in b.files[f"stage1/{s}.jsonl"] if r["prompt"] == prompt}

    assert all(
        len(split_of(r["prompt"])) == 1 for r in b.files["stage1/train.jsonl"] + b.files["stage1/val.jsonl"]
    )
    # Adding unrelated rows moves no existing record between splits.
    wjsonl(tmp_path / "a.jsonl", rows + twins + reasoning_rows(30, "Other"))
    b2 = D.build_datasets(p, smol_tokenizer, tmp_path)
    assert val_ids <= {r["id"] for r in b2.files["stage1/val.jsonl"]}
    assert not val_ids & {r["id"] for r in b2.files["stage1/train.jsonl"]}


def test_weights_subsample_and_repeat_train_only(tmp_path: Path, smol_tokenizer: Any) -> None:
    wjsonl(tmp_path / "a.jsonl", reasoning_rows(60, "A"))
    wjsonl(tmp_path / "b.jsonl", reasoning_rows(60, "B"))
    p = make_params(
        tmp_path,
        stage1=[
            src("a", "jsonl", "a.jsonl", "reasoning", R_FIELDS, weight=0.5),
            src("b", "jsonl", "b.jsonl", "reasoning", R_FIELDS, weight=2),
        ],
        val_fraction=0.2,
    )
    b = D.build_datasets(p, smol_tokenizer, tmp_path)
    m = b.metrics
    assert 15 < m["stage1.rows_out.a"] < 45 and m["stage1.dropped.subsampled"] == 60 - m["stage1.rows_out.a"]
    train_b = [r for r in b.files["stage1/train.jsonl"] if r["source"] == "b"]
    val_b = [r for r in b.files["stage1/val.jsonl"] if r["source"] == "b"]
    assert len(train_b) == 2 * len({r["id"] for r in train_b}) and len({r["id"] for r in val_b}) == len(val_b)
    assert m["stage1.repeated"] == len(train_b) // 2
    assert D.build_datasets(p, smol_tokenizer, tmp_path).files == b.files


# --------------------------------------------------------------------------- PII


def test_pii_masking(tmp_path: Path, smol_tokenizer: Any) -> None:
    text = (
        "환자 주민번호 900101-1234567, 다른 환자 0203154123456. 연락처 010-1234-5678, 병원 02-123-4567, "
        "(031) 765-4321. 혈압 84/56 mmHg, 2022년, 수가 1,234,567원, p=0.0212345678"
    )
    masked, counts = D.mask_pii(text)
    assert counts == {"rrn": 2, "phone": 3}
    for secret in ("900101-1234567", "0203154123456", "010-1234-5678", "02-123-4567", "765-4321"):
        assert secret not in masked
    assert "******-*******" in masked and "***-****-****" in masked and "(***) ***-****" in masked
    for kept in ("84/56 mmHg", "2022년", "1,234,567원", "p=0.0212345678"):
        assert kept in masked

    wjsonl(
        tmp_path / "s2.jsonl",
        [
            {
                "instruction": "문의 010 9876 5432 로 연락",
                "input": "",
                "output": "주민번호 851212-2345678 확인",
            }
        ],
    )
    p = make_params(
        tmp_path, stage2=[src("s2", "jsonl", "s2.jsonl", "instruction", I_FIELDS)], val_fraction=0.01
    )
    b = D.build_datasets(p, smol_tokenizer, tmp_path)
    (rec,) = b.files["stage2/train.jsonl"] + b.files["stage2/val.jsonl"]
    assert "*** **** ****" in rec["prompt"] and "******-*******" in rec["completion"]
    assert (b.metrics["stage2.pii_masked"], b.metrics["stage2.pii.rrn"], b.metrics["stage2.pii.phone"]) == (
        2,
        1,
        1,
    )


# Foreign residents' RRNs: gender digit 5/6 born in the 1900s, 7/8 in the 2000s (YYMMDD-GNNNNNN).
FOREIGN_RRNS = ("850315-5123456", "920704-6234567", "050101-7345678", "120229-8456789")


def test_foreign_residents_rrns_are_masked_with_and_without_the_hyphen(tmp_path: Path, smol_tokenizer: Any) -> None:
    """Gender digits 5-8 are masked like 1-4, hyphenated and as 13 digits in a row, in the text and through
    preprocess's build (data and counts)."""
    for rrn in FOREIGN_RRNS:
        for form in (rrn, rrn.replace("-", "")):
            text = f"외국인 등록번호 {form} 확인"
            masked, counts = D.mask_pii(text)
            assert counts == {"rrn": 1}, form
            assert masked == text.replace(form, "".join("*" if c.isdigit() else c for c in form)), form
            assert D.find_pii(text) == "rrn", form

    hyphen, bare = FOREIGN_RRNS[0], FOREIGN_RRNS[3].replace("-", "")
    wjsonl(tmp_path / "s2.jsonl", [{"instruction": f"등록번호 {hyphen} 의 환자", "input": "",
                                    "output": f"외국인 {bare} 로 접수"}])
    p = make_params(tmp_path, stage2=[src("s2", "jsonl", "s2.jsonl", "instruction", I_FIELDS)], val_fraction=0.01)
    b = D.build_datasets(p, smol_tokenizer, tmp_path)
    (rec,) = b.files["stage2/train.jsonl"] + b.files["stage2/val.jsonl"]
    assert "등록번호 ******-******* 의" in rec["prompt"] and "외국인 ************* 로" in rec["completion"]
    assert hyphen not in json.dumps(b.files, ensure_ascii=False) and bare not in json.dumps(b.files, ensure_ascii=False)
    assert (b.metrics["stage2.pii_masked"], b.metrics["stage2.pii.rrn"]) == (2, 2)


def test_pii_fail_names_file_row_column(tmp_path: Path, smol_tokenizer: Any) -> None:
    wxlsx(
        tmp_path / "t.xlsx",
        {"S": [["원문", "번역문"], ["두통", "headache"], ["전화 010-2222-3333 주세요", "Call me."]]},
    )
    p = make_params(tmp_path, stage2=[src("t", "xlsx", "t.xlsx", "translation", T_FIELDS)], pii="fail")
    assert error_of(D.build_datasets, p, smol_tokenizer, tmp_path) == (
        "t.xlsx sheet 'S' row 3: column '원문' contains a Korean phone number (data.pii=fail)."
    )
    p_off = make_params(tmp_path, stage2=[src("t", "xlsx", "t.xlsx", "translation", T_FIELDS)], pii="off")
    b = D.build_datasets(p_off, smol_tokenizer, tmp_path)
    assert b.metrics["stage2.pii_masked"] == 0
    assert any(
        "010-2222-3333" in r["prompt"] + r["completion"]
        for r in b.files["stage2/train.jsonl"] + b.files["stage2/val.jsonl"]
    )


# --------------------------------------------------------------------------- length


def _long_rows() -> list[dict[str, str]]:
    return [
        {"Question": "Short question?", "Complex_CoT": "step " * 10, "Response": "Short."},
        {
            "Question": "Long reasoning?",
            "Complex_CoT": "reasoning step " * 300,
            "Response": "The final answer.",
        },
        {"Question": "Long Korean answer?", "Complex_CoT": "생각", "Response": "한국어 답변입니다. " * 200},
        {"Question": "Huge question " * 300, "Complex_CoT": "c", "Response": "r"},
    ]


def test_overlong_drop(tmp_path: Path, smol_tokenizer: Any) -> None:
    wjsonl(tmp_path / "l.jsonl", _long_rows())
    p = make_params(
        tmp_path,
        stage1=[src("l", "jsonl", "l.jsonl", "reasoning", R_FIELDS)],
        max_seq_length=160,
        val_fraction=0.01,
        overlong="drop",
        max_cot_loss_share=1.0,
        max_loss_share=1.0,
    )
    b = D.build_datasets(p, smol_tokenizer, tmp_path)
    recs = b.files["stage1/train.jsonl"] + b.files["stage1/val.jsonl"]
    m = b.metrics
    assert (m["stage1.dropped.overlong"], m["stage1.truncated"]) == (3, 0)
    # The long-CoT record's answer would fit; the long answer would not, and the huge question alone
    # takes the whole length (labelled as such, not as an answer that would be cut).
    assert (
        m["stage1.dropped.overlong_cot"],
        m["stage1.dropped.overlong_answer"],
        m["stage1.dropped.overlong_question"],
    ) == (1, 1, 1)
    assert (m["stage1.cot_lost"], m["stage1.reasoning_records"], m["stage1.cot_lost_share"]) == (3, 4, 0.75)
    assert (m["stage1.records_lost.l"], m["stage1.loss_share.l"]) == (3, 0.75)
    assert len(recs) == 1 and recs[0]["n_tokens"] <= 160


def _cot_tokens(tok: Any, completion: str) -> int:
    cot = completion.split("<think>\n", 1)[1].split("\n</think>\n", 1)[0]
    return len(tok(cot, add_special_tokens=False)["input_ids"])


def test_overlong_truncate_shortens_only_the_cot(tmp_path: Path, smol_tokenizer: Any) -> None:
    wjsonl(tmp_path / "l.jsonl", _long_rows())
    p = make_params(
        tmp_path,
        stage1=[src("l", "jsonl", "l.jsonl", "reasoning", R_FIELDS)],
        max_seq_length=160,
        val_fraction=0.01,
        overlong="truncate",
        max_cot_loss_share=1.0,
        max_loss_share=1.0,
        min_cot_keep_share=0.0,  # the long CoT keeps about a tenth: kept here, dropped at the default
    )
    b = D.build_datasets(p, smol_tokenizer, tmp_path)
    recs = {
        r["prompt"].split("### Question:\n")[1][:12]: r
        for r in b.files["stage1/train.jsonl"] + b.files["stage1/val.jsonl"]
    }
    m = b.metrics
    # The long Korean answer would be cut and the huge prompt cannot fit: both dropped, never cut.
    assert (
        m["stage1.truncated"],
        m["stage1.dropped.overlong"],
        m["stage1.dropped.overlong_answer"],
        m["stage1.dropped.overlong_question"],
    ) == (
        1,
        2,
        1,
        1,
    )
    assert set(recs) == {"Short questi", "Long reasoni"}
    for r in recs.values():
        real = len(smol_tokenizer(r["prompt"] + r["completion"])["input_ids"])
        assert r["n_tokens"] == real <= 160
        assert r["completion"].startswith("<think>\n") and r["completion"].endswith(EOS)
        assert "\n</think>\n" in r["completion"] and "\ufffd" not in r["completion"]
    long_cot = recs["Long reasoni"]["completion"]
    assert long_cot.endswith("\n</think>\nThe final answer." + EOS)  # the cot is cut, the answer kept
    assert _cot_tokens(smol_tokenizer, long_cot) >= 32 and long_cot.startswith(
        "<think>\nreasoning step reasoning"
    )
    assert recs["Short questi"]["completion"] == D.render_completion(("step " * 10).strip(), "Short.", EOS)
    report = D.data_report(p, b)
    assert "| l | reasoning | jsonl | 1 | 4 | 0 | 0 | 0 | 0 | 0 | 0 | 1 | 1 | 0 | 1 | 2 |" in report
    assert "record over 160 tokens: the answer would be cut | 1 |" in report
    assert "record over 160 tokens by the question alone | 1 |" in report
    assert "Reasoning records that lost their CoT to the length limit (dropped): 2 of 4 (50.0%)" in report
    kept = _cot_tokens(smol_tokenizer, long_cot) / _cot_tokens(
        smol_tokenizer, D.render_completion(("reasoning step " * 300).strip(), "", "")
    )
    assert m["stage1.cot_keep_share_min"] == m["stage1.cot_keep_share_p10"] == m["stage1.cot_keep_share_mean"]
    assert abs(m["stage1.cot_keep_share_min"] - kept) < 0.01 and m["stage1.cot_keep_share_min"] < 0.25
    share = D.percent(m["stage1.cot_keep_share_min"], 1)
    assert (
        f"CoT tokens kept by the 1 records shortened to fit: mean {share}, p10 {share}, min {share};"
        in report
    )


def test_truncate_keeps_min_cot_tokens_or_drops(smol_tokenizer: Any) -> None:
    cot, answer = "reasoning step " * 100, "The final answer."
    n_prompt = len(smol_tokenizer(D.render_prompt(SYSTEM, "q?"))["input_ids"])
    frame = len(smol_tokenizer(D.render_completion("", answer, EOS), add_special_tokens=False)["input_ids"])
    room = 100 - n_prompt - frame  # CoT tokens that fit in 100
    comp, n, kept = D.truncate_completion(smol_tokenizer, cot, answer, EOS, n_prompt, 100, min_cot=room - 4)
    assert (
        n_prompt + n <= 100 and comp.endswith(answer + EOS) and _cot_tokens(smol_tokenizer, comp) >= room - 4
    )
    n_cot = len(smol_tokenizer(cot.strip(), add_special_tokens=False)["input_ids"])
    assert abs(kept - _cot_tokens(smol_tokenizer, comp) / n_cot) < 0.02
    # Below min_keep_share of the CoT's tokens the record is refused like one below min_cot.
    assert (
        D.truncate_completion(smol_tokenizer, cot, answer, EOS, n_prompt, 100, min_keep_share=kept + 0.05)
        == "cot"
    )
    assert (
        D.truncate_completion(smol_tokenizer, cot, answer, EOS, n_prompt, 100, min_keep_share=kept - 0.05)[2]
        == kept
    )
    assert D.truncate_completion(smol_tokenizer, cot, answer, EOS, n_prompt, 100, min_cot=room + 1) == "cot"
    assert D.truncate_completion(smol_tokenizer, cot, answer, EOS, n_prompt, n_prompt + frame - 1) == "answer"
    # min_cot 0 allows an emptied CoT, still never a cut answer.
    comp, _, kept = D.truncate_completion(
        smol_tokenizer, cot, answer, EOS, n_prompt, n_prompt + frame, min_cot=0
    )
    assert comp == D.render_completion("", answer, EOS) and kept == 0.0
    assert D.truncate_completion(smol_tokenizer, "", "x " * 200, EOS, n_prompt, 100) == "answer"


def test_non_reasoning_answers_are_never_cut(tmp_path: Path, smol_tokenizer: Any) -> None:
    wjsonl(
        tmp_path / "i.jsonl",
        [
            {"instruction": "짧게 답하세요.", "input": "", "output": "네."},
            {"instruction": "길게 설명하세요.", "input": "", "output": "아주 긴 설명입니다. " * 100},
        ],
    )
    p = make_params(
        tmp_path,
        stage2=[src("i", "jsonl", "i.jsonl", "instruction", I_FIELDS)],
        overlong="truncate",
        max_seq_length=160,
        max_loss_share=0.5,
    )
    b = D.build_datasets(p, smol_tokenizer, tmp_path)
    recs = b.files["stage2/train.jsonl"] + b.files["stage2/val.jsonl"]
    assert [r["completion"] for r in recs] == ["<think>\n\n</think>\n네." + EOS]
    assert (b.metrics["stage2.dropped.overlong_answer"], b.metrics["stage2.truncated"]) == (1, 0)
    assert b.metrics["stage2.cot_lost"] == 0  # not a reasoning record: the CoT contract does not count it


def test_cot_loss_contract_fails_with_one_sentence(tmp_path: Path, smol_tokenizer: Any) -> None:
    long = [
        {"Question": f"Case {i}?", "Complex_CoT": "reasoning step " * 200, "Response": "Answer."}
        for i in range(3)
    ]
    wjsonl(tmp_path / "l.jsonl", reasoning_rows(7) + long)
    kw: dict[str, Any] = {
        "stage1": [src("l", "jsonl", "l.jsonl", "reasoning", R_FIELDS)],
        "max_seq_length": 160,
    }
    # 3 of 10 records need their CoT cut: kept (truncate) with more than a quarter of their CoT tokens
    # (min_cot_keep_share 0.25), lost below min_cot_tokens 150.
    b = D.build_datasets(make_params(tmp_path, overlong="truncate", **kw), smol_tokenizer, tmp_path)
    assert (b.metrics["stage1.truncated"], b.metrics["stage1.cot_lost"]) == (3, 0)
    msg = error_of(
        D.build_datasets,
        make_params(tmp_path, overlong="truncate", min_cot_tokens=150, **kw),
        smol_tokenizer,
        tmp_path,
    )
    # The same 3 records also break the source's loss contract (30 % > max_loss_share 0.2): one error names both.
    assert msg == (
        "data.stage1: 2 problems: (1) data.stage1: 3 of 10 reasoning records (30.0%) would lose their CoT at "
        "model.max_seq_length=160 (0 because the answer would be cut, 3 because the CoT would be cut below "
        "data.min_cot_tokens=150 or data.min_cot_keep_share=0.25), more than data.max_cot_loss_share=0.1; raise "
        "model.max_seq_length or data.max_cot_loss_share, or lower data.min_cot_tokens or "
        "data.min_cot_keep_share; (2) data.stage1 source 'l': 3 of 10 records (30.0%) would be lost (3 records "
        "over model.max_seq_length=160 whose CoT would be cut below data.min_cot_tokens=150 or "
        "data.min_cot_keep_share=0.25), more than data.max_loss_share=0.2; raise model.max_seq_length, lower "
        "data.min_cot_tokens or data.min_cot_keep_share, or raise data.max_loss_share."
    )
    msg = error_of(D.build_datasets, make_params(tmp_path, overlong="drop", **kw), smol_tokenizer, tmp_path)
    assert msg.startswith("data.stage1: 2 problems: (1) data.stage1: 3 of 10 reasoning records (30.0%) would")
    assert (
        "because the CoT would be cut (data.overlong=drop)), more than data.max_cot_loss_share=0.1; raise "
        "model.max_seq_length or data.max_cot_loss_share, or set data.overlong=truncate; (2) "
    ) in msg
    b = D.build_datasets(
        make_params(tmp_path, overlong="drop", max_cot_loss_share=0.3, max_loss_share=0.3, **kw),
        smol_tokenizer,
        tmp_path,
    )
    assert (
        b.metrics["stage1.cot_lost_share"] == b.metrics["stage1.loss_share.l"] == 0.3
    )  # at the limits: allowed


def test_min_cot_keep_share_drops_and_counts_as_cot_lost(tmp_path: Path, smol_tokenizer: Any) -> None:
    # Two long CoTs of different lengths: at 160 the longer keeps a smaller share of its tokens.
    long = [
        {"Question": f"Case {i}?", "Complex_CoT": "reasoning step " * n, "Response": "Answer."}
        for i, n in enumerate((100, 300))
    ]
    wjsonl(tmp_path / "l.jsonl", reasoning_rows(8) + long)
    kw: dict[str, Any] = {
        "stage1": [src("l", "jsonl", "l.jsonl", "reasoning", R_FIELDS)],
        "max_seq_length": 160,
        "overlong": "truncate",
        "max_cot_loss_share": 1.0,
        "max_loss_share": 1.0,
    }
    b = D.build_datasets(make_params(tmp_path, min_cot_keep_share=0.0, **kw), smol_tokenizer, tmp_path)
    m = b.metrics
    assert m["stage1.truncated"] == 2 and m["stage1.cot_lost"] == 0
    lo, hi = (
        m["stage1.cot_keep_share_min"],
        m["stage1.cot_keep_share_mean"] * 2 - m["stage1.cot_keep_share_min"],
    )
    assert 0 < lo < 0.25 < hi < 1 and m["stage1.cot_keep_share_p10"] == lo  # nearest rank of two: the lower
    # At min_cot_keep_share 0.25 the record that keeps less is dropped and counts as CoT lost.
    b = D.build_datasets(make_params(tmp_path, min_cot_keep_share=0.25, **kw), smol_tokenizer, tmp_path)
    m = b.metrics
    assert (m["stage1.truncated"], m["stage1.cot_lost"], m["stage1.dropped.overlong_cot"]) == (1, 1, 1)
    assert m["stage1.cot_keep_share_min"] == round(hi, 4)
    msg = error_of(
        D.build_datasets,
        make_params(tmp_path, min_cot_keep_share=0.25, **{**kw, "max_cot_loss_share": 0.05}),
        smol_tokenizer,
        tmp_path,
    )
    assert msg.startswith(
        "data.stage1: 1 of 10 reasoning records (10.0%) would lose their CoT at model.max_seq_length=160 (0 because "
        "the answer would be cut, 1 because the CoT would be cut below data.min_cot_tokens=32 or "
        "data.min_cot_keep_share=0.25), more than data.max_cot_loss_share=0.05;"
    )


def _instructions(n: int, n_long: int) -> list[dict[str, str]]:
    """KoAlpaca-shaped rows; the first n_long have an answer far over 160 tokens."""
    return [
        {
            "instruction": f"{i}번 증상을 설명하세요.",
            "input": "",
            "output": ("아주 긴 설명입니다. " * 60) if i < n_long else f"{i}번 증상은 두통입니다.",
        }
        for i in range(n)
    ]


def test_loss_contract_per_source_fails_in_one_sentence(
    tmp_path: Path, smol_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # 6 of 10 instruction records over the limit (the KoAlpaca at 192: 60 %).
    wjsonl(tmp_path / "i.jsonl", _instructions(10, 6))
    kw: dict[str, Any] = {
        "stage2": [src("ko", "jsonl", "i.jsonl", "instruction", I_FIELDS)],
        "max_seq_length": 160,
    }
    assert error_of(D.build_datasets, make_params(tmp_path, **kw), smol_tokenizer, tmp_path) == (
        "data.stage2 source 'ko': 6 of 10 records (60.0%) would be lost (6 records over model.max_seq_length=160 "
        "whose answer would be cut), more than data.max_loss_share=0.2; raise model.max_seq_length or raise "
        "data.max_loss_share."
    )
    # Within the limit the loss is a warning, still one sentence, and in the metrics.
    wjsonl(tmp_path / "i.jsonl", _instructions(10, 1))
    with caplog.at_level("WARNING", logger="kmed.data"):
        b = D.build_datasets(make_params(tmp_path, **kw), smol_tokenizer, tmp_path)
    assert (
        "data.stage2 source 'ko': 1 of 10 records (10.0%) would be lost (1 record over model.max_seq_length=160 "
        "whose answer would be cut); the stage fails above data.max_loss_share=0.2." in caplog.messages
    )
    assert (b.metrics["stage2.records_lost.ko"], b.metrics["stage2.loss_share.ko"]) == (1, 0.1)
    assert "| ko | 10 | 1 | 10.0% |" in D.data_report(make_params(tmp_path, **kw), b)


def test_a_source_left_with_no_records_fails_unless_allowed(
    tmp_path: Path, smol_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The Ko-En eval pairs are the training pairs: every row is removed as eval overlap.
    pairs = [["두통이 있어요.", "I have a headache."], ["기침이 나요.", "I have a cough."]]
    wxlsx(tmp_path / "t.xlsx", {"S": [["원문", "번역문"], *pairs]})
    wjsonl(tmp_path / "koen.jsonl", [{"ko": k, "en": e} for k, e in pairs])
    koen = src("koen", "jsonl", "koen.jsonl", "pairs", {"ko": "ko", "en": "en"})
    wjsonl(tmp_path / "s2.jsonl", _instructions(3, 0))
    inst = src("ko", "jsonl", "s2.jsonl", "instruction", I_FIELDS)

    def params(**t: Any) -> Params:
        return make_params(
            tmp_path, stage2=[inst, src("t", "xlsx", "t.xlsx", "translation", T_FIELDS, **t)], koen=koen
        )

    assert error_of(D.build_datasets, params(), smol_tokenizer, tmp_path) == (
        "data.stage2 source 't' ends with no records (of its 2 rows: 2 rows equal to a data.eval item); take the "
        "data.eval items out of the source or set allow_empty: true on the source."
    )
    with caplog.at_level("WARNING", logger="kmed.data"):
        b = D.build_datasets(params(allow_empty=True), smol_tokenizer, tmp_path)
    assert (
        "data.stage2 source 't' ends with no records (of its 2 rows: 2 rows equal to a data.eval item); allowed "
        "by allow_empty: true." in caplog.messages
    )
    assert (
        b.metrics["stage2.rows_out.t"],
        b.metrics["stage2.records_lost.t"],
        b.metrics["stage2.loss_share.t"],
    ) == (
        0,
        4,
        1.0,
    )
    # A source that only repeats another loses nothing, but still ends empty.
    wjsonl(tmp_path / "dup.jsonl", _instructions(3, 0))
    p = make_params(tmp_path, stage2=[inst, src("dup", "jsonl", "dup.jsonl", "instruction", I_FIELDS)])
    assert error_of(D.build_datasets, p, smol_tokenizer, tmp_path) == (
        "data.stage2 source 'dup' ends with no records (of its 3 rows: 3 rows duplicating earlier rows); set "
        "allow_empty: true on the source."
    )


def test_report_and_error_round_a_share_the_same(tmp_path: Path, smol_tokenizer: Any) -> None:
    # 28 of 33 is 0.84848...: rounded to 0.8485 first it would read 84.9 % in one place and 84.8 % in the other.
    rows = reasoning_rows(5) + [
        {"Question": f"Long {i}?", "Complex_CoT": "c", "Response": "한국어 답변입니다. " * 100}
        for i in range(28)
    ]
    wjsonl(tmp_path / "l.jsonl", rows)
    kw: dict[str, Any] = {
        "stage1": [src("l", "jsonl", "l.jsonl", "reasoning", R_FIELDS)],
        "max_loss_share": 1.0,
    }
    msg = error_of(
        D.build_datasets, make_params(tmp_path, max_cot_loss_share=0.8, **kw), smol_tokenizer, tmp_path
    )
    assert msg.startswith("data.stage1: 28 of 33 reasoning records (84.8%)")
    p = make_params(tmp_path, max_cot_loss_share=0.9, **kw)
    report = D.data_report(p, D.build_datasets(p, smol_tokenizer, tmp_path))
    assert "(dropped): 28 of 33 (84.8%)" in report and "| l | 33 | 28 | 84.8% |" in report


# --------------------------------------------------------------------------- the stage


def test_build_is_deterministic(tmp_path: Path, smol_tokenizer: Any) -> None:
    wjsonl(tmp_path / "s1.jsonl", reasoning_rows(30))
    wxlsx(
        tmp_path / "t.xlsx", {"S": [["원문", "번역문"]] + [[f"문장 {i}", f"Sentence {i}"] for i in range(20)]}
    )
    p = make_params(tmp_path, stage2=[src("t", "xlsx", "t.xlsx", "translation", T_FIELDS, weight=1.5)])

    def run(out: Path) -> dict[str, bytes]:
        b = D.build_datasets(p, smol_tokenizer, tmp_path)
        D.write_outputs(b, out)
        (out / "report.md").write_text(D.data_report(p, b) + D.debug_samples(b.samples, EOS))
        (out / "metrics.json").write_text(json.dumps(b.metrics, sort_keys=True))
        return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}

    first, second = run(tmp_path / "o1"), run(tmp_path / "o2")
    assert first == second and len(first) == 8
    rec = json.loads(first["stage1/train.jsonl"].splitlines()[0])
    assert set(rec) == {"id", "source", "task", "lang", "question", "prompt", "completion", "n_prompt_tokens", "n_tokens"}


def _stage_repo(root: Path, tok: Any) -> None:
    tok.save_pretrained(root / "models/base")
    make_params(root)  # writes the default fixture files
    raw = {
        "model": {"max_seq_length": 384},
        "data": {
            "system_prompt": SYSTEM,
            "pii": "mask",
            "stage1": {"sources": [src("s1", "jsonl", "s1.jsonl", "reasoning", R_FIELDS)]},
            "stage2": {"sources": [src("s2", "jsonl", "s2.jsonl", "instruction", I_FIELDS)]},
            "eval": {
                "mcq": src("mcq", "csv", "ev/mcq.csv", "mcq", MCQ_FIELDS),
                "koen": src("koen", "jsonl", "ev/koen.jsonl", "pairs", {"ko": "ko", "en": "en"}),
            },
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")


def test_stage_main_writes_outputs_and_a_bad_input_leaves_them(
    tmp_path: Path, smol_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stages import preprocess

    _stage_repo(tmp_path, smol_tokenizer)
    monkeypatch.chdir(tmp_path)
    preprocess.main()
    files = sorted(
        str(f.relative_to(tmp_path / "data/processed"))
        for f in (tmp_path / "data/processed").rglob("*.jsonl")
    )
    assert files == [
        "eval/koen.jsonl",
        "eval/mcq.jsonl",
        "stage1/train.jsonl",
        "stage1/val.jsonl",
        "stage2/train.jsonl",
        "stage2/val.jsonl",
    ]
    metrics = json.loads((tmp_path / "metrics/data.json").read_text())
    assert metrics["stage1.rows_in.s1"] == 3 and metrics["eval.mcq_rows"] == 2
    debug = (tmp_path / "reports/debug_samples.md").read_text()
    assert "**MASKED**" in debug and "**TRAINED**" in debug and "<think>" in debug and EOS in debug
    assert "| s1 | reasoning | jsonl | 1 | 3 |" in (tmp_path / "reports/data_report.md").read_text()
    before = {f: f.read_bytes() for f in (tmp_path / "data/processed").rglob("*.jsonl")}

    (tmp_path / "s1.jsonl").write_text('{"Question": "q", "Complex_CoT": \n', encoding="utf-8")
    with pytest.raises(StageError, match=r"^s1\.jsonl line 1: malformed JSON"):
        preprocess.main()
    assert {f: f.read_bytes() for f in (tmp_path / "data/processed").rglob("*.jsonl")} == before
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".processed")]


def test_openpyxl_uses_defusedxml() -> None:
    import openpyxl.xml

    D.ensure_defusedxml()
    assert openpyxl.xml.DEFUSEDXML is True


def test_real_params_sample_sources_resolve() -> None:
    """The shipped params.yaml names sources that exist inside the repo (no stale paths)."""
    from kmed.config import load_params

    root = Path(__file__).resolve().parents[1]
    p = load_params(root / "params.yaml")
    for s in (*p.data.stage1.sources, *p.data.stage2.sources, p.data.eval.mcq, p.data.eval.koen):
        if s.kind != "hf" and os.path.exists(root / "data/samples"):
            assert D.resolve_source_files(s, root), s.name


def test_masked_empty_think_is_input_not_target(tmp_path: Path, smol_tokenizer: Any) -> None:
    """think_for_non_reasoning: masked keeps the token sequence of `empty` but moves the empty block into the
    masked prompt, so stage 2 is not trained to leave <think> empty (issue 39); reasoning records keep theirs."""
    from kmed.lm import IGNORE, encode_records

    rows = [{"instruction": f"질문 {i}에 답하세요.", "input": "", "output": f"답 {i}."} for i in range(6)]
    wjsonl(tmp_path / "i.jsonl", rows)
    stage2 = [src("i", "jsonl", "i.jsonl", "instruction", I_FIELDS)]
    out = {}
    for mode in ("empty", "masked"):
        p = make_params(tmp_path, stage2=stage2, think_for_non_reasoning=mode)
        f = D.build_datasets(p, smol_tokenizer, tmp_path).files
        out[mode] = sorted(f["stage2/train.jsonl"] + f["stage2/val.jsonl"], key=lambda r: r["id"])
        assert all("<think>\n" in r["completion"] for r in f["stage1/train.jsonl"] + f["stage1/val.jsonl"])
    for e, m in zip(out["empty"], out["masked"], strict=True):
        assert e["prompt"] + e["completion"] == m["prompt"] + m["completion"]  # the same text the model reads
        assert m["prompt"].endswith("### Response:\n<think>\n\n</think>\n") and "<think>" not in m["completion"]
        assert m["completion"].endswith(EOS)
        enc = encode_records(smol_tokenizer, [m], 384)[0]
        trained = [t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != IGNORE]
        assert "think" not in smol_tokenizer.decode(trained)


def test_stage2_replay_draws_from_stage1_train_only(tmp_path: Path, smol_tokenizer: Any) -> None:
    """data.stage2_replay: stage-1 *training* records make up that share of stage 2's train split; never a val
    record, so nothing held out leaks; seeded, so a rerun draws the same ones."""
    wjsonl(tmp_path / "s1.jsonl", reasoning_rows(40))
    stage1 = [src("s1", "jsonl", "s1.jsonl", "reasoning", R_FIELDS)]
    rows = [{"instruction": f"질문 {i}에 답하세요.", "input": "", "output": f"답 {i}."} for i in range(30)]
    wjsonl(tmp_path / "i.jsonl", rows)
    stage2 = [src("i", "jsonl", "i.jsonl", "instruction", I_FIELDS)]
    base = D.build_datasets(make_params(tmp_path, stage1=stage1, stage2=stage2), smol_tokenizer, tmp_path)
    p = make_params(tmp_path, stage1=stage1, stage2=stage2, stage2_replay=0.25)
    b = D.build_datasets(p, smol_tokenizer, tmp_path)
    own = base.files["stage2/train.jsonl"]
    train2 = b.files["stage2/train.jsonl"]
    replayed = [r for r in train2 if r.get("replay")]
    assert train2[: len(own)] == own and len(replayed) == len(train2) - len(own)
    assert len(replayed) == round(0.25 * len(own) / 0.75) and b.metrics["stage2.replay_rows"] == len(replayed)
    s1_train = {r["id"] for r in b.files["stage1/train.jsonl"]}
    s1_val = {r["id"] for r in b.files["stage1/val.jsonl"]}
    assert {r["id"] for r in replayed} <= s1_train and not {r["id"] for r in replayed} & s1_val
    assert all(r["task"] == "reasoning" and "<think>\n\n</think>" not in r["completion"] for r in replayed)
    assert b.files["stage2/val.jsonl"] == base.files["stage2/val.jsonl"]  # val2 stays stage 2's own
    again = D.build_datasets(p, smol_tokenizer, tmp_path).files["stage2/train.jsonl"]
    assert again == train2

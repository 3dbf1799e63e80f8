"""Files as people export them (issue 36): what a mapping yields is checked, blank rows follow one rule in
every reader, and every problem of a run is named at once.

Each fixture has the shape the issue met: an AI Hub-style workbook with 128 pairs followed by 200
formatted but empty rows, the same with a title row above the header and with a repeated column name,
swapped and ID translation mappings, JSON numbers where text belongs, two sources over the loss limit,
medical-o1 records with `Complex_CoT: null`, an eval CSV ending in blank lines, UTF-16 and CR-only files.
Outcomes are checked in the metrics and the data report, not only in whether the build passed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kmed import data as D
from tests.test_data import (
    I_FIELDS,
    MCQ_FIELDS,
    MCQ_HEADER,
    MCQ_ROWS,
    R_FIELDS,
    T_FIELDS,
    error_of,
    make_params,
    one_source,
    reasoning_rows,
    src,
    wcsv,
    wjsonl,
)

N_PAIRS = 128
N_FORMATTED = 200


def _pairs(n: int = N_PAIRS) -> list[list[Any]]:
    """AI Hub-style rows: an ID, the Korean source (원문) and its English translation (번역문)."""
    return [
        [
            100001 + i,
            f"{i}번 환자는 {i % 7 + 1}일째 두통과 미열이 있습니다.",
            f"Patient {i} has had a headache and a mild fever for {i % 7 + 1} days.",
        ]
        for i in range(n)
    ]


def _workbook(path: Path, header: list[str], title: bool = False, formatted_empty: int = N_FORMATTED) -> Path:
    """A workbook the way Excel leaves it: optionally a title row and a blank row above the header, the
    pairs, then `formatted_empty` rows whose cells carry a border and a fill but no value."""
    import openpyxl
    from openpyxl.styles import Border, PatternFill, Side

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    if title:
        ws.append(["한영 병렬 말뭉치 (의료) — 2023년 배포본"])
        ws.append([])
    ws.append(header)
    for row in _pairs():
        ws.append(row)
    thin = Side(style="thin")
    first = ws.max_row + 1
    for r in range(first, first + formatted_empty):
        for c in range(1, len(header) + 1):
            cell = ws.cell(row=r, column=c)
            cell.border = Border(left=thin, right=thin, top=thin, bottom=thin)
            cell.fill = PatternFill("solid", fgColor="FFF2CC")
    path.parent.mkdir(parents=True, exist_ok=True)
    wb.save(path)
    return path


def _translation(**kw: Any) -> dict[str, Any]:
    return src("aihub", "xlsx", "aihub.xlsx", "translation", kw.pop("fields", T_FIELDS), **kw)


# --------------------------------------------------------------------------- blank rows


def test_a_workbook_with_200_formatted_empty_rows_loses_nothing_and_reports_200_blank(
    tmp_path: Path, smol_tokenizer: Any
) -> None:
    _workbook(tmp_path / "aihub.xlsx", ["ID", "원문", "번역문"])
    p = make_params(tmp_path, stage2=[_translation()])
    b = D.build_datasets(p, smol_tokenizer, tmp_path)
    m = b.metrics
    assert m["stage2.rows_in.aihub"] == N_PAIRS + N_FORMATTED
    assert m["stage2.blank.aihub"] == N_FORMATTED
    assert (m["stage2.records_offered.aihub"], m["stage2.records_lost.aihub"]) == (2 * N_PAIRS, 0)
    assert m["stage2.rows_out.aihub"] == 2 * N_PAIRS  # both directions of all 128 pairs
    assert len(b.files["stage2/train.jsonl"]) + len(b.files["stage2/val.jsonl"]) == 2 * N_PAIRS
    report = D.data_report(p, b)
    row = f"| aihub | translation | xlsx | 1 | {N_PAIRS + N_FORMATTED} | {N_FORMATTED} | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | {2 * N_PAIRS} |"
    assert row in report
    assert f"| aihub | {2 * N_PAIRS} | 0 | 0.0% |" in report


def test_blank_rows_are_counted_alike_in_jsonl_and_eval_csv(tmp_path: Path, smol_tokenizer: Any) -> None:
    # JSON Lines with two blank lines between records, and a KorMedMCQA CSV that ends in 5 blank lines.
    rows = reasoning_rows(4)
    (tmp_path / "r.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rows[:2])
        + "\n\n\n"
        + "\n".join(json.dumps(r) for r in rows[2:])
        + "\n",
        encoding="utf-8",
    )
    wcsv(tmp_path / "ev/mcq.csv", MCQ_HEADER, MCQ_ROWS)
    with (tmp_path / "ev/mcq.csv").open("a", encoding="utf-8") as fh:
        fh.write("\n" * 5)
    mcq = src("mcq", "csv", "ev/mcq.csv", "mcq", MCQ_FIELDS)
    p = make_params(tmp_path, stage1=[src("r", "jsonl", "r.jsonl", "reasoning", R_FIELDS)], mcq=mcq)
    # make_params rewrote ev/mcq.csv only when mcq is None, so the trailing blank lines stay.
    b = D.build_datasets(p, smol_tokenizer, tmp_path)
    m = b.metrics
    assert (m["stage1.rows_in.r"], m["stage1.blank.r"], m["stage1.records_lost.r"]) == (6, 2, 0)
    assert (m["eval.rows_in.mcq"], m["eval.blank.mcq"], m["eval.mcq_rows"]) == (7, 5, 2)
    report = D.data_report(p, b)
    assert "| r | reasoning | jsonl | 1 | 6 | 2 | 0 | 0 |" in report
    assert "| mcq | mcq | 7 | 5 | 0 | 0 | 2 |" in report  # rows in 7 = 2 items + 5 blank: nothing unexplained


# --------------------------------------------------------------------------- header row, duplicate names


def test_a_title_row_is_named_and_header_row_reads_past_it(tmp_path: Path, smol_tokenizer: Any) -> None:
    _workbook(tmp_path / "aihub.xlsx", ["ID", "원문", "번역문"], title=True, formatted_empty=0)
    s = one_source(tmp_path, "xlsx", "aihub.xlsx", "translation", T_FIELDS)
    assert error_of(D.read_source, s, tmp_path, 50) == (
        "aihub.xlsx sheet 'Sheet1': missing columns '원문', '번역문' (found: '한영 병렬 말뭉치 (의료) — 2023년 배포본'); "
        "row 3 holds them: set header_row: 3 on source 'x'."
    )
    rows, sk = D.read_source(
        one_source(tmp_path, "xlsx", "aihub.xlsx", "translation", T_FIELDS, header_row=3), tmp_path, 50
    )
    assert len(rows) == N_PAIRS and sk.blank == 0 and rows[0].n == 4  # row numbers stay the sheet's
    # The same for a CSV export with the title line (Excel pads it with commas).
    lines = ["한영 병렬 말뭉치,,", ",,", "ID,원문,번역문", *(",".join(map(str, r)) for r in _pairs(3))]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    msg = error_of(D.read_source, one_source(tmp_path, "csv", "t.csv", "translation", T_FIELDS), tmp_path, 50)
    assert msg.endswith("; row 3 holds them: set header_row: 3 on source 'x'.")
    rows, _ = D.read_source(
        one_source(tmp_path, "csv", "t.csv", "translation", T_FIELDS, header_row=3), tmp_path, 50
    )
    assert [r.n for r in rows] == [4, 5, 6] and rows[0].values["ko"].startswith("0번 환자는")


@pytest.mark.parametrize("kind", ["xlsx", "csv"])
def test_two_columns_with_one_name_are_refused_and_a_number_picks_one(tmp_path: Path, kind: str) -> None:
    # A reviewed copy pasted next to the original: 원문 twice (columns B and D).
    header = ["ID", "원문", "번역문", "원문"]
    if kind == "xlsx":
        _workbook(tmp_path / "d.xlsx", header, formatted_empty=0)
        import openpyxl

        wb = openpyxl.load_workbook(tmp_path / "d.xlsx")
        for r in range(2, N_PAIRS + 2):
            wb.active.cell(row=r, column=4, value=f"(검수) {wb.active.cell(row=r, column=2).value}")
        wb.save(tmp_path / "d.xlsx")
        where, cols, pick = "d.xlsx sheet 'Sheet1'", "columns B and D", "reads column B"
    else:
        wcsv(tmp_path / "d.csv", header, [[*r, f"(검수) {r[1]}"] for r in _pairs()])
        where, cols, pick = "d.csv", "columns 2 and 4", "reads column 2"
    msg = error_of(
        D.read_source, one_source(tmp_path, kind, f"d.{kind}", "translation", T_FIELDS), tmp_path, 50
    )
    assert msg == (
        f"{where}: 2 columns are named '원문' ({cols}), so it is ambiguous which one 'ko' reads; pick one by "
        f"its number (fields: {{ko: 2}} {pick})."
    )
    for col, starts in ((2, "0번"), (4, "(검수) 0번")):
        rows, _ = D.read_source(
            one_source(tmp_path, kind, f"d.{kind}", "translation", {"ko": col, "en": "번역문"}), tmp_path, 50
        )
        assert len(rows) == N_PAIRS and rows[0].values["ko"].startswith(starts)


def test_column_numbers_are_for_csv_and_xlsx_only(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="only kind csv or xlsx takes"):
        one_source(tmp_path, "jsonl", "x.jsonl", "translation", {"ko": 2, "en": "en"})
    with pytest.raises(ValidationError, match="header_row is for kind csv or xlsx"):
        one_source(tmp_path, "json", "x.json", "translation", T_FIELDS, header_row=2)
    _workbook(tmp_path / "d.xlsx", ["ID", "원문", "번역문"], formatted_empty=0)
    msg = error_of(
        D.read_source, one_source(tmp_path, "xlsx", "d.xlsx", "translation", {"ko": 7, "en": 3}), tmp_path, 50
    )
    assert msg == "d.xlsx sheet 'Sheet1': fields maps 'ko' to column 7, but the header has 3 columns."


# --------------------------------------------------------------------------- what a mapping yields


def test_a_swapped_or_id_translation_mapping_is_refused_with_the_measured_shares(
    tmp_path: Path, smol_tokenizer: Any
) -> None:
    _workbook(tmp_path / "aihub.xlsx", ["ID", "원문", "번역문"], formatted_empty=0)
    swapped = make_params(tmp_path, stage2=[_translation(fields={"ko": "번역문", "en": "원문"})])
    assert error_of(D.build_datasets, swapped, smol_tokenizer, tmp_path) == (
        "source 'aihub': fields ko: '번역문' and en: '원문' do not hold Korean and English text: 0.0% of the 'ko' "
        "values are mostly Hangul and 0.0% of the 'en' values are mostly Latin (of 128 rows; "
        "data.min_lang_share=0.5); swap them."
    )
    # The ID column as en, read as text (a CSV): numbers are no language either.
    wcsv(tmp_path / "aihub.csv", ["ID", "원문", "번역문"], _pairs())
    ids = src("aihub", "csv", "aihub.csv", "translation", {"ko": "원문", "en": "ID"})
    assert error_of(D.build_datasets, make_params(tmp_path, stage2=[ids]), smol_tokenizer, tmp_path) == (
        "source 'aihub': field en: 'ID' does not hold English text: 0.0% of the 'en' values are mostly Latin "
        "(of 128 rows; data.min_lang_share=0.5); map them to the columns that hold the Korean and English text."
    )
    # The eval pairs are held to the same rule.
    wjsonl(tmp_path / "koen.jsonl", [{"ko": "I have a cough.", "en": "기침이 나요."}] * 2)
    koen = src("koen", "jsonl", "koen.jsonl", "pairs", {"ko": "ko", "en": "en"})
    msg = error_of(D.build_datasets, make_params(tmp_path, koen=koen), smol_tokenizer, tmp_path)
    assert msg.startswith("source 'koen': fields ko: 'ko' and en: 'en' do not hold Korean and English text")
    # The right mapping passes, and 0 turns the check off for a swapped one.
    b = D.build_datasets(make_params(tmp_path, stage2=[_translation()]), smol_tokenizer, tmp_path)
    assert (b.metrics["stage2.lang.ko"], b.metrics["stage2.lang.en"]) == (N_PAIRS, N_PAIRS)
    D.build_datasets(
        make_params(tmp_path, stage2=[_translation(fields={"ko": "번역문", "en": "원문"})], min_lang_share=0),
        smol_tokenizer,
        tmp_path,
    )


def test_numbers_where_text_belongs_fail_listing_them_or_are_a_counted_loss(
    tmp_path: Path, smol_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A KoAlpaca-style JSON array in which 7 of 40 outputs are JSON numbers, as a script wrote them.
    recs = [
        {
            "instruction": f"{i}번 질문에 답하세요.",
            "input": "",
            "output": 1000 + i if i % 6 == 0 else f"{i}번 답입니다.",
        }
        for i in range(40)
    ]
    (tmp_path / "ko.json").write_text(json.dumps(recs, ensure_ascii=False, indent=2), encoding="utf-8")
    ko = src("ko", "json", "ko.json", "instruction", I_FIELDS)
    assert error_of(D.build_datasets, make_params(tmp_path, stage2=[ko]), smol_tokenizer, tmp_path) == (
        "source 'ko': 7 non-text values where text belongs (data.non_text=fail): ko.json record 1 column 'output' "
        "holds a number (1000), ko.json record 7 column 'output' holds a number (1006), ko.json record 13 column "
        "'output' holds a number (1012), ko.json record 19 column 'output' holds a number (1018), ko.json record 25 "
        "column 'output' holds a number (1024) and 2 more; map fields to the columns that hold the text, or set "
        "data.non_text=count to leave such rows out as a counted loss."
    )
    p = make_params(tmp_path, stage2=[ko], non_text="count")
    with caplog.at_level("WARNING", logger="kmed.data"):
        b = D.build_datasets(p, smol_tokenizer, tmp_path)
    m = b.metrics
    assert (m["stage2.rows_in.ko"], m["stage2.dropped.non_text"], m["stage2.records_lost.ko"]) == (40, 7, 7)
    assert m["stage2.rows_out.ko"] == 33
    assert not any(
        r["completion"].startswith("<think>\n\n</think>\n\n10") for r in b.files["stage2/train.jsonl"]
    )
    report = D.data_report(p, b)
    assert "| ko | instruction | json | 1 | 40 | 0 | 0 | 7 |" in report
    assert "| row with a non-text value (data.non_text=count) | 7 |" in report
    assert any(
        "7 rows with a non-text value (ko.json record 1 column 'output'" in msg for msg in caplog.messages
    )
    # A numeric xlsx cell in 번역문 is the same case; MCQ answers and options may be numbers.
    _workbook(tmp_path / "aihub.xlsx", ["ID", "원문", "번역문"], formatted_empty=0)
    msg = error_of(
        D.read_source,
        one_source(tmp_path, "xlsx", "aihub.xlsx", "translation", {"ko": "원문", "en": "ID"}),
        tmp_path,
        50,
    )
    assert msg.startswith(
        "source 'x': 128 non-text values where text belongs (data.non_text=fail): aihub.xlsx sheet 'Sheet1' row 2 "
        "(cell A2) column 'ID' holds a number (100001)"
    )
    assert (
        D.read_source(one_source(tmp_path, "csv", "ev/mcq.csv", "mcq", MCQ_FIELDS), tmp_path, 50)[1].non_text
        == 0
    )


# --------------------------------------------------------------------------- every problem in one run


def test_partly_null_records_are_a_counted_loss_naming_each_place(
    tmp_path: Path, smol_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # medical-o1 as a JSON array, 3 of 30 records with "Complex_CoT": null and 1 record all null (blank).
    recs = reasoning_rows(30)
    for i in (4, 11, 27):
        recs[i]["Complex_CoT"] = None
    recs.append({"Question": None, "Complex_CoT": None, "Response": None})
    (tmp_path / "m.json").write_text(json.dumps(recs, indent=2), encoding="utf-8")
    p = make_params(tmp_path, stage1=[src("m", "json", "m.json", "reasoning", R_FIELDS)])
    with caplog.at_level("WARNING", logger="kmed.data"):
        b = D.build_datasets(p, smol_tokenizer, tmp_path)
    m = b.metrics
    assert (m["stage1.rows_in.m"], m["stage1.blank.m"], m["stage1.dropped.incomplete"]) == (31, 1, 3)
    assert (m["stage1.records_offered.m"], m["stage1.records_lost.m"], m["stage1.rows_out.m"]) == (30, 3, 27)
    assert (
        "data.stage1 source 'm': 3 of 30 records (10.0%) would be lost (3 rows with an empty required cell "
        "(m.json record 5 column 'Complex_CoT', m.json record 12 column 'Complex_CoT', m.json record 28 column "
        "'Complex_CoT')); the stage fails above data.max_loss_share=0.2." in caplog.messages
    )
    report = D.data_report(p, b)
    assert "| m | reasoning | json | 1 | 31 | 1 | 3 | 0 |" in report
    assert "| row with an empty required cell | 3 |" in report and "| m | 30 | 3 | 10.0% |" in report


def test_every_source_over_the_loss_limit_is_named_in_one_error(tmp_path: Path, smol_tokenizer: Any) -> None:
    # KoAlpaca with 12 of 20 outputs null, and AI Hub pairs mostly without their 번역문.
    recs = [
        {"instruction": f"{i}번 질문", "input": "", "output": None if i < 12 else f"{i}번 답"}
        for i in range(20)
    ]
    (tmp_path / "ko.json").write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    rows = [[r[0], r[1], r[2] if i < 2 else None] for i, r in enumerate(_pairs(10))]
    wcsv(tmp_path / "aihub.csv", ["ID", "원문", "번역문"], rows)
    p = make_params(
        tmp_path,
        stage2=[
            src("ko", "json", "ko.json", "instruction", I_FIELDS),
            src("aihub", "csv", "aihub.csv", "translation", T_FIELDS),
        ],
    )
    msg = error_of(D.build_datasets, p, smol_tokenizer, tmp_path)
    assert msg.startswith(
        "data.stage2: 2 problems: (1) data.stage2 source 'ko': 12 of 20 records (60.0%) would be lost (12 rows with "
        "an empty required cell (ko.json record 1 column 'output', "
    )
    assert (
        "; (2) data.stage2 source 'aihub': 16 of 20 records (80.0%) would be lost (16 from 8 rows with an empty "
        "required cell (aihub.csv row 4 column '번역문', aihub.csv row 5 column '번역문', aihub.csv row 6 column "
        "'번역문', aihub.csv row 7 column '번역문', aihub.csv row 8 column '번역문' and 3 more)), more than "
        "data.max_loss_share=0.2; map fields to the columns that hold the text or raise data.max_loss_share."
    ) in msg


# --------------------------------------------------------------------------- encodings and line endings


def test_utf16_csvs_cr_only_jsonl_and_decoder_messages(tmp_path: Path) -> None:
    text = "ko,en\n두통이 있어요.,I have a headache.\n"
    (tmp_path / "u16.csv").write_bytes(text.encode("utf-16"))  # Excel's "Unicode text": BOM + UTF-16LE
    assert D.read_source(one_source(tmp_path, "csv", "u16.csv", "pairs", {}), tmp_path, 50)[0][0].values == {
        "ko": "두통이 있어요.",
        "en": "I have a headache.",
    }
    (tmp_path / "nobom.csv").write_bytes(text.encode("utf-16-le"))
    assert error_of(D.read_source, one_source(tmp_path, "csv", "nobom.csv", "pairs", {}), tmp_path, 50) == (
        "nobom.csv: cannot decode the text as UTF-8 or CP949: its bytes look like UTF-16 without a byte-order "
        "mark (every other byte is 0x00); save it as UTF-8 or as UTF-16 with a BOM."
    )
    recs = reasoning_rows(3)
    (tmp_path / "cr.jsonl").write_text(
        "\r".join(json.dumps(r) for r in recs) + "\r", encoding="utf-8", newline=""
    )
    rows = D.read_source(one_source(tmp_path, "jsonl", "cr.jsonl", "reasoning", R_FIELDS), tmp_path, 50)[0]
    assert [r.n for r in rows] == [1, 2, 3] and rows[2].values["answer"] == "Answer 2."
    (tmp_path / "u.jsonl").write_text('{"Question": "unterminated}\n', encoding="utf-8")
    msg = error_of(
        D.read_source, one_source(tmp_path, "jsonl", "u.jsonl", "reasoning", R_FIELDS), tmp_path, 50
    )
    assert msg == "u.jsonl line 1: malformed JSON (Unterminated string starting at column 14)."

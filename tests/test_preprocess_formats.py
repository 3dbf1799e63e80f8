"""Preprocess on files in their published formats, through the real entry (`python -m stages.preprocess`).

A throwaway workdir holds the embedded tokenizer as models/base, the repo's params.yaml with only the
data sources changed, and files built here the way the public datasets ship them: the medical
reasoning set as a pretty-printed JSON array (Question / Complex_CoT / Response), the same as an object
holding its records under a key and as an array behind a .jsonl name, a Korean instruction JSON array,
KorMedMCQA CSVs once with letter and once with integer answers in one folder, an AI Hub-style xlsx with
a description sheet and a CP949 pairs CSV. Some reasoning records are too long for
model.max_seq_length (192): one only by its CoT, one by its answer, one leaving too little CoT room.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.stagekit import ROOT, run_stage, write_params

pytestmark = pytest.mark.integration

MAX_LEN = 192
EOS = "<|im_end|>"
R_FIELDS = {"question": "Question", "cot": "Complex_CoT", "answer": "Response"}
MCQ_HEADER = ["subject", "year", "period", "q_number", "question", "A", "B", "C", "D", "E", "answer"]
N_MCQ = 8
LONG_COT = " ".join(f"Step {i}: weigh the findings against the differential." for i in range(60))


def _medical(n: int, tag: str) -> list[dict[str, str]]:
    return [
        {
            "Question": f"{tag} case {i}: a patient has fever and a cough for {i + 2} days. What next?",
            "Complex_CoT": f"Fever and cough for {i + 2} days suggest a respiratory infection; check vitals.",
            "Response": f"Examine the chest and check oxygen saturation ({tag} {i}).",
        }
        for i in range(n)
    ]


def _answer_leaving_little_cot_room(tok: Any, system: str, question: str) -> str:
    """An answer that fits with the prompt but leaves fewer than 32 tokens (data.min_cot_tokens) for the CoT."""
    from kmed.data import render_completion, render_prompt

    n_prompt = len(tok(render_prompt(system, question))["input_ids"])
    answer = "Start oxygen."
    while True:
        frame = len(tok(render_completion("", answer, EOS), add_special_tokens=False)["input_ids"])
        if MAX_LEN - n_prompt - frame < 20:
            assert MAX_LEN - n_prompt - frame > 0
            return answer
        answer += " Then reassess."


def _write_csv(path: Path, rows: list[list[Any]], encoding: str = "utf-8") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(MCQ_HEADER if len(rows[0]) == len(MCQ_HEADER) else ["ko", "en"])
    w.writerows(rows)
    path.write_bytes(buf.getvalue().encode(encoding))


def _digest(root: Path) -> dict[str, str]:
    out = {}
    for folder in ("data/processed", "metrics", "reports"):
        for p in sorted((root / folder).rglob("*")):
            if p.is_file():
                out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer: Any) -> dict[str, Any]:
    import openpyxl

    wd = tmp_path_factory.mktemp("formats")
    smol_tokenizer.save_pretrained(wd / "models/base")
    system = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["system_prompt"]
    raw = wd / "data/raw"
    raw.mkdir(parents=True)

    # Reasoning: a pretty-printed JSON array, an object with the records under "data", an array in a .jsonl.
    long_q = "A patient with chest pain asks what to do first. What is the first step?"
    tight_q = "A patient with sudden shortness of breath arrives. What is the first step?"
    arrays = {
        "medical.json": [
            *_medical(10, "array"),
            {
                "Question": long_q,
                "Complex_CoT": LONG_COT,
                "Response": "Obtain a 12-lead ECG within 10 minutes.",
            },
        ],
        "medical_array.jsonl": [
            *_medical(8, "misnamed"),
            {
                "Question": "Explain the whole cardiac cycle.",
                "Complex_CoT": "Think.",
                "Response": "Phase. " * 200,
            },
        ],
    }
    tight = _answer_leaving_little_cot_room(smol_tokenizer, system, tight_q)
    objects = [*_medical(8, "object"), {"Question": tight_q, "Complex_CoT": LONG_COT, "Response": tight}]
    for name, rows in arrays.items():
        (raw / name).write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    (raw / "medical_object.json").write_text(
        json.dumps({"version": "1.0", "data": objects}, ensure_ascii=False, indent=2), encoding="utf-8"
    )

    # Korean instructions as a JSON array; an AI Hub-style workbook with a description sheet first.
    ko = [
        {
            "instruction": f"{i}번 증상을 한 문장으로 설명하세요.",
            "input": "",
            "output": f"{i}번 증상은 두통입니다.",
        }
        for i in range(6)
    ]
    (raw / "ko_instructions.json").write_text(json.dumps(ko, ensure_ascii=False, indent=2), encoding="utf-8")
    wb = openpyxl.Workbook()
    wb.active.title = "설명"
    wb.active.append(["이 파일은 한영 병렬 말뭉치입니다."])
    ws = wb.create_sheet("Sheet1")
    ws.append(["ID", "원문", "번역문"])
    for i in range(4):
        ws.append([f"K-{i}", f"{i}일째 기침이 나요.", f"I have had a cough for {i} days."])
    wb.save(raw / "aihub_koen.xlsx")

    # KorMedMCQA twice in one folder: letter answers and integer answers; Ko-En test pairs in CP949.
    mcq = [
        [
            "doctor" if i % 2 else "nurse",
            2023,
            1,
            i + 1,
            f"{i + 1}번 환자에게 가장 먼저 할 처치는?",
            "수액",
            "산소",
            "항생제",
            "진통제",
            "관찰",
            "ABCDE"[i % 5],
        ]
        for i in range(N_MCQ)
    ]
    _write_csv(raw / "kmcq/letter.csv", mcq)
    _write_csv(raw / "kmcq/number.csv", [[*r[:-1], "ABCDE".index(r[-1]) + 1] for r in mcq])
    _write_csv(
        raw / "koen_cp949.csv",
        [["숨이 차요.", "I am short of breath."], ["열이 나요.", "I have a fever."]],
        encoding="cp949",
    )

    sources = {
        "data.stage1.sources": [
            {
                "name": "med_array",
                "kind": "json",
                "path": "data/raw/medical.json",
                "task": "reasoning",
                "fields": R_FIELDS,
            },
            {
                "name": "med_object",
                "kind": "json",
                "path": "data/raw/medical_object.json",
                "task": "reasoning",
                "fields": R_FIELDS,
            },
            {
                "name": "med_misnamed",
                "kind": "jsonl",
                "path": "data/raw/medical_array.jsonl",
                "task": "reasoning",
                "fields": R_FIELDS,
            },
        ],
        "data.stage2.sources": [
            {
                "name": "ko_inst",
                "kind": "json",
                "path": "data/raw/ko_instructions.json",
                "task": "instruction",
                "fields": {"instruction": "instruction", "input": "input", "output": "output"},
            },
            {
                "name": "aihub",
                "kind": "xlsx",
                "path": "data/raw/aihub_koen.xlsx",
                "sheet": "Sheet1",
                "task": "translation",
                "fields": {"ko": "원문", "en": "번역문"},
            },
        ],
        "data.eval.mcq": {
            "name": "kmcq",
            "kind": "csv",
            "path": "data/raw/kmcq",
            "task": "mcq",
            "fields": {
                **{f: f for f in ("question", "A", "B", "C", "D", "E", "answer")},
                "subject": "subject",
            },
        },
        "data.eval.koen": {
            "name": "koen",
            "kind": "csv",
            "path": "data/raw/koen_cp949.csv",
            "task": "pairs",
            "fields": {"ko": "ko", "en": "en"},
        },
        "model.max_seq_length": MAX_LEN,
        "data.overlong": "truncate",
        "data.min_cot_tokens": 32,
        # The long CoT keeps about a tenth of its tokens: kept here to test truncation itself; at the
        # default min_cot_keep_share it is refused (test_a_cot_cut_to_a_tenth_is_refused_at_the_default).
        "data.min_cot_keep_share": 0.0,
        "data.max_cot_loss_share": 0.1,
    }
    write_params(wd, **sources)
    proc = run_stage(wd, "stages.preprocess")
    answers = {r["Question"]: r["Response"] for rows in (*arrays.values(), objects) for r in rows}
    return {"path": wd, "proc": proc, "sources": sources, "answers": answers, "long_q": long_q}


def _records(wd: Path, stage: str) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for split in ("train", "val")
        for line in (wd / f"data/processed/{stage}/{split}.jsonl").read_text(encoding="utf-8").splitlines()
    ]


def test_json_arrays_objects_and_a_misnamed_array_are_read(workdir: dict[str, Any]) -> None:
    wd, log = workdir["path"], workdir["proc"].stderr
    assert "data/raw/medical_array.jsonl: a JSON array, not JSON Lines; read as kind json" in log
    assert "data/raw/medical_object.json: records under the key 'data'" in log
    m = json.loads((wd / "metrics/data.json").read_text())
    assert (
        m["stage1.rows_in.med_array"],
        m["stage1.rows_in.med_object"],
        m["stage1.rows_in.med_misnamed"],
    ) == (11, 9, 9)
    assert m["stage2.rows_in.ko_inst"] == 6 and m["stage2.rows_out.aihub"] == 8
    assert m["eval.koen_rows"] == 2  # the CP949 CSV


def test_long_records_keep_their_answer_and_some_cot(workdir: dict[str, Any]) -> None:
    wd = workdir["path"]
    recs = _records(wd, "stage1")
    assert len(recs) == 29 - 2
    for r in recs:
        question = r["prompt"].split("### Question:\n", 1)[1].split("\n\n### Response:\n", 1)[0]
        cot, answer = r["completion"].removeprefix("<think>\n").split("\n</think>\n")
        assert cot.strip(), "an empty <think> block"
        assert answer == workdir["answers"][question] + EOS, "a cut answer"
        assert r["n_tokens"] <= MAX_LEN
    (cut,) = [r for r in recs if workdir["long_q"] in r["prompt"]]
    assert LONG_COT not in cut["completion"] and cut["completion"].startswith("<think>\nStep 0:")
    m = json.loads((wd / "metrics/data.json").read_text())
    assert m["stage1.truncated"] == 1
    assert (
        m["stage1.dropped.overlong_answer"],
        m["stage1.dropped.overlong_cot"],
        m["stage1.dropped.overlong"],
    ) == (1, 1, 2)
    assert (m["stage1.cot_lost"], m["stage1.reasoning_records"]) == (2, 29)
    report = (wd / "reports/data_report.md").read_text(encoding="utf-8")
    assert "| med_array | reasoning | json | 1 | 11 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 1 | 11 |" in report
    assert "| med_object | reasoning | json | 1 | 9 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 1 | 0 | 8 |" in report
    assert "| med_misnamed | reasoning | jsonl | 1 | 9 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 1 | 0 | 0 | 8 |" in report
    assert f"| record over {MAX_LEN} tokens: the answer would be cut | 1 |" in report
    assert "Reasoning records that lost their CoT to the length limit (dropped): 2 of 29 (6.9%)" in report
    assert re.search(
        r"CoT tokens kept by the 1 records shortened to fit: mean (\d+\.\d)%, p10 \1%, min \1%;", report
    )
    assert m["stage1.cot_keep_share_min"] < 0.25  # what the default min_cot_keep_share refuses
    # Each source's loss within data.max_loss_share is one WARNING sentence, and a row of the report.
    log = workdir["proc"].stderr
    for name in ("med_object", "med_misnamed"):
        assert (
            f"WARNING kmed.data: data.stage1 source '{name}': 1 of 9 records (11.1%) would be lost (1 record"
            in log
        )
        assert f"| {name} | 9 | 1 | 11.1% |" in report


def test_letter_and_integer_copies_of_the_same_mcqs_are_one_set(workdir: dict[str, Any]) -> None:
    wd = workdir["path"]
    mcq = [json.loads(line) for line in (wd / "data/processed/eval/mcq.jsonl").read_text().splitlines()]
    assert len(mcq) == N_MCQ and len({q["id"] for q in mcq}) == N_MCQ
    assert [q["answer"] for q in mcq] == ["ABCDE"[i % 5] for i in range(N_MCQ)]
    assert {q["file"] for q in mcq} == {"data/raw/kmcq/letter.csv"}
    assert [q["subject"] for q in mcq[:2]] == ["nurse", "doctor"]
    m = json.loads((wd / "metrics/data.json").read_text())
    assert m["eval.rows_in.kmcq"] == 2 * N_MCQ and m["eval.mcq_duplicates.answer_format"] == N_MCQ
    assert m["eval.dropped.duplicate"] == N_MCQ
    assert (
        f"Duplicates dropped: {N_MCQ} (mcq: 0 exact, 0 equal after normalisation, {N_MCQ} the same answer"
        in (wd / "reports/data_report.md").read_text(encoding="utf-8")
    )


def test_cot_loss_contract_fails_in_one_sentence_and_touches_nothing(workdir: dict[str, Any]) -> None:
    wd = workdir["path"]
    before = _digest(wd)
    write_params(wd, **{**workdir["sources"], "data.max_cot_loss_share": 0.05})
    try:
        proc = run_stage(wd, "stages.preprocess", check=False)
    finally:
        write_params(wd, **workdir["sources"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        "ERROR: data.stage1: 2 of 29 reasoning records (6.9%) would lose their CoT at model.max_seq_length=192 "
        "(1 because the answer would be cut, 1 because the CoT would be cut below data.min_cot_tokens=32 or "
        "data.min_cot_keep_share=0), more than data.max_cot_loss_share=0.05; raise model.max_seq_length or "
        "data.max_cot_loss_share, or lower data.min_cot_tokens or data.min_cot_keep_share."
    )
    assert "Traceback" not in proc.stderr
    assert _digest(wd) == before
    assert not [p for p in (wd / "data").iterdir() if p.name.startswith(".processed")]


def _refused(workdir: dict[str, Any], **overrides: Any) -> str:
    """Run preprocess with the fixture's params changed; return its last line, checking it failed and
    changed nothing (the fixture's params are restored after)."""
    wd = workdir["path"]
    before = _digest(wd)
    write_params(wd, **{**workdir["sources"], **overrides})
    try:
        proc = run_stage(wd, "stages.preprocess", check=False)
    finally:
        write_params(wd, **workdir["sources"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert _digest(wd) == before
    assert not [p for p in (wd / "data").iterdir() if p.name.startswith(".processed")]
    return proc.stderr.strip().splitlines()[-1]


def test_a_cot_cut_to_a_tenth_is_refused_at_the_default(workdir: dict[str, Any]) -> None:
    # The 192-token run kept 7-22 % of each cut CoT and counted them all as kept.
    assert _refused(workdir, **{"data.min_cot_keep_share": 0.25}) == (
        "ERROR: data.stage1: 3 of 29 reasoning records (10.3%) would lose their CoT at model.max_seq_length=192 "
        "(1 because the answer would be cut, 2 because the CoT would be cut below data.min_cot_tokens=32 or "
        "data.min_cot_keep_share=0.25), more than data.max_cot_loss_share=0.1; raise model.max_seq_length or "
        "data.max_cot_loss_share, or lower data.min_cot_tokens or data.min_cot_keep_share."
    )


def test_an_unmapped_question_next_to_a_question_column_is_refused(workdir: dict[str, Any]) -> None:
    # medical-o1 as published: `question` is the source MCQ stem, `Question` the rewritten question.
    wd = workdir["path"]
    recs = [
        {"question": f"Stem {i}: which drug?", **r, "options": {"A": "x"}}
        for i, r in enumerate(_medical(4, "o1"))
    ]
    (wd / "data/raw/medical_o1.json").write_text(
        json.dumps(recs, ensure_ascii=False, indent=2), encoding="utf-8"
    )
    source = {"name": "o1", "kind": "json", "path": "data/raw/medical_o1.json", "task": "reasoning"}
    unmapped = {**source, "fields": {"cot": "Complex_CoT", "answer": "Response"}}
    assert _refused(workdir, **{"data.stage1.sources": [unmapped]}) == (
        "ERROR: data/raw/medical_o1.json record 1: fields does not map 'question', so it would read the column "
        "'question', but the file also has 'Question'; map it explicitly (fields: {question: Question} or "
        "{question: question})."
    )


def test_instruction_records_over_the_limit_fail_the_loss_contract(workdir: dict[str, Any]) -> None:
    # KoAlpaca as a JSON array; at 192 tokens 6 of its 10 answers cannot fit (the issue saw 180 of 300).
    wd = workdir["path"]
    rows = [
        {
            "instruction": f"{i}번 질문: 감기에 좋은 음식은?",
            "input": "",
            "output": ("따뜻한 국물과 충분한 수분 섭취가 좋습니다. " * 12) if i < 6 else "죽이 좋습니다.",
        }
        for i in range(10)
    ]
    (wd / "data/raw/koalpaca.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    koalpaca = {
        "name": "koalpaca",
        "kind": "json",
        "path": "data/raw/koalpaca.json",
        "task": "instruction",
        "fields": {"instruction": "instruction", "input": "input", "output": "output"},
    }
    assert _refused(workdir, **{"data.stage2.sources": [koalpaca]}) == (
        "ERROR: data.stage2 source 'koalpaca': 6 of 10 records (60.0%) would be lost (6 records over "
        "model.max_seq_length=192 whose answer would be cut), more than data.max_loss_share=0.2; raise "
        "model.max_seq_length or raise data.max_loss_share."
    )


def test_eval_pairs_equal_to_a_training_source_leave_it_empty(
    workdir: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The Ko-En eval pairs are the AI Hub workbook's own pairs: all of them go as eval overlap.
    wd = workdir["path"]
    _write_csv(
        wd / "data/raw/koen_same.csv",
        [[f"{i}일째 기침이 나요.", f"I have had a cough for {i} days."] for i in range(4)],
    )
    koen = {**workdir["sources"]["data.eval.koen"], "path": "data/raw/koen_same.csv"}
    assert _refused(workdir, **{"data.eval.koen": koen}) == (
        "ERROR: data.stage2 source 'aihub' ends with no records (of its 4 rows: 4 rows equal to a data.eval item); "
        "take the data.eval items out of the source or set allow_empty: true on the source."
    )
    # Declared as possibly empty, the stage runs and says so in one WARNING (in a copy: the fixture stays).
    copy = tmp_path_factory.mktemp("allow_empty") / "wd"
    shutil.copytree(wd, copy)
    aihub = [
        {**s, "allow_empty": True} if s["name"] == "aihub" else s
        for s in workdir["sources"]["data.stage2.sources"]
    ]
    write_params(copy, **{**workdir["sources"], "data.eval.koen": koen, "data.stage2.sources": aihub})
    proc = run_stage(copy, "stages.preprocess")
    assert (
        "WARNING kmed.data: data.stage2 source 'aihub' ends with no records (of its 4 rows: 4 rows equal to a "
        "data.eval item); allowed by allow_empty: true." in proc.stderr
    )
    m = json.loads((copy / "metrics/data.json").read_text())
    assert (m["stage2.rows_out.aihub"], m["stage2.records_lost.aihub"], m["eval.overlap_removed"]) == (
        0,
        8,
        4,
    )

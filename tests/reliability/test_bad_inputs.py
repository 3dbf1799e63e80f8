"""Bad inputs end to end: `dvc repro -s preprocess` in a git+dvc repo with the real pipeline.

A bad input fails the stage with one sentence naming the file (and row/cell where there is one), and
loses nothing: data/processed, reports, metrics and dvc.lock from the previous good run stay
byte-identical. Inputs with a documented handling (CP949 text, duplicates, overlong records, RRNs)
go through and are counted in metrics/data.json.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability import kit
from tests.reliability.conftest import PipelineRepo

pytestmark = pytest.mark.reliability

OUTSIDE_ROWS = '{"instruction": "외부 파일", "input": "", "output": "이 파일은 저장소 밖에 있습니다."}\n'


def _stage2_source(
    repo: PipelineRepo,
    path: str,
    kind: str = "jsonl",
    task: str = "instruction",
    fields: dict[str, str] | None = None,
) -> None:
    """Replace the Korean-instruction source of stage 2 with one at `path`."""
    import yaml

    raw = yaml.safe_load((repo.path / "params.yaml").read_text())
    src = raw["data"]["stage2"]["sources"][0]
    src.update({"path": path, "kind": kind, "task": task})
    if fields is not None:
        src["fields"] = fields
    (repo.path / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))


def empty_file(repo: PipelineRepo, tmp: Path) -> str:
    (repo.path / "data/samples/ko_instructions.jsonl").write_text("")
    return "data/samples/ko_instructions.jsonl: the file is empty."


def wrong_columns(repo: PipelineRepo, tmp: Path) -> str:
    f = repo.path / "data/samples/medical_reasoning.jsonl"
    f.write_text(f.read_text(encoding="utf-8").replace('"Question":', '"Query":'), encoding="utf-8")
    return "data/samples/medical_reasoning.jsonl line 1: missing column 'Question' (found: 'Query', "


def formula_cell(repo: PipelineRepo, tmp: Path) -> str:
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "S"
    for row in (
        ["ID", "원문", "번역문"],
        ["F-1", "두통이 심해요.", "I have a bad headache."],
        ["F-2", "기침이 나요.", '=B3&" (translated)"'],
    ):
        ws.append(row)
    wb.save(repo.path / "data/samples/aihub_koen/formula.xlsx")
    return (
        "data/samples/aihub_koen/formula.xlsx sheet 'S' cell C3: formula '=B3&\" (translated)\"' has no "
        "cached value"
    )


def dotdot_path(repo: PipelineRepo, tmp: Path) -> str:
    (repo.path.parent / "outside.jsonl").write_text(OUTSIDE_ROWS)
    _stage2_source(repo, "../outside.jsonl")
    return "source 'kocommercial_sample': path '../outside.jsonl' escapes the repository root"


def absolute_path(repo: PipelineRepo, tmp: Path) -> str:
    (tmp / "outside.jsonl").write_text(OUTSIDE_ROWS)
    _stage2_source(repo, str(tmp / "outside.jsonl"))
    return f"source 'kocommercial_sample': path '{tmp / 'outside.jsonl'}' escapes the repository root"


def symlink_out(repo: PipelineRepo, tmp: Path) -> str:
    (tmp / "outside.jsonl").write_text(OUTSIDE_ROWS)
    os.symlink(tmp / "outside.jsonl", repo.path / "data/raw/linked.jsonl")
    _stage2_source(repo, "data/raw/linked.jsonl")
    return "source 'kocommercial_sample': 'data/raw/linked.jsonl' resolves outside the repository root"


def case_variant_column(repo: PipelineRepo, tmp: Path) -> str:
    """medical-o1 as published: a JSON array whose records hold `question` (the source MCQ stem) next to
    `Question` (what the CoT answers); the params leave `question` unmapped."""
    import yaml

    lines = (repo.path / "data/samples/medical_reasoning.jsonl").read_text(encoding="utf-8").splitlines()
    recs = [{"question": f"Stem {i}", **json.loads(line)} for i, line in enumerate(lines)]
    (repo.path / "data/raw/medical_o1.json").write_text(json.dumps(recs, ensure_ascii=False, indent=2))
    raw = yaml.safe_load((repo.path / "params.yaml").read_text())
    src = raw["data"]["stage1"]["sources"][0]
    src.update(
        kind="json", path="data/raw/medical_o1.json", fields={"cot": "Complex_CoT", "answer": "Response"}
    )
    (repo.path / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))
    return (
        "data/raw/medical_o1.json record 1: fields does not map 'question', so it would read the column "
        "'question', but the file also has 'Question'; map it explicitly"
    )


def instructions_over_the_limit(repo: PipelineRepo, tmp: Path) -> str:
    """36 of the 60 Korean instructions get an answer far over model.max_seq_length (KoAlpaca at 192: 60 %)."""
    f = repo.path / "data/samples/ko_instructions.jsonl"
    rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()]
    for r in rows[:36]:
        r["output"] = " ".join([r["output"]] * 6)
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return (
        "data.stage2 source 'kocommercial_sample': 36 of 60 records (60.0%) would be lost (36 records over "
        "model.max_seq_length=192 whose answer would be cut), more than data.max_loss_share=0.2; raise "
        "model.max_seq_length or raise data.max_loss_share."
    )


def eval_pairs_are_a_training_source(repo: PipelineRepo, tmp: Path) -> str:
    """The Ko-En eval pairs are the AI Hub workbooks' own pairs: all 235 rows go as eval overlap."""
    import openpyxl

    pairs = []
    for book in sorted((repo.path / "data/samples/aihub_koen").glob("*.xlsx")):
        wb = openpyxl.load_workbook(book, read_only=True)
        for ws in wb:
            rows = ws.iter_rows(values_only=True)
            header = list(next(rows))
            pairs += [{"ko": r[header.index("원문")], "en": r[header.index("번역문")]} for r in rows]
        wb.close()
    (repo.path / "data/samples/koen_test.jsonl").write_text(
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8"
    )
    return (
        f"data.stage2 source 'aihub_koen_sample' ends with no records (of its {len(pairs)} rows: {len(pairs)} rows "
        "equal to a data.eval item); take the data.eval items out of the source or set allow_empty: true on the "
        "source."
    )


def symlink_in_folder(repo: PipelineRepo, tmp: Path) -> str:
    """A folder source inside the repo, one of whose files links out of it: each file found through a
    folder (or glob) is checked, not only the path written in params."""
    (tmp / "outside.jsonl").write_text(OUTSIDE_ROWS)
    folder = repo.path / "data/raw/instructions"
    folder.mkdir()
    (folder / "notes.jsonl").write_bytes((repo.path / "data/samples/ko_instructions.jsonl").read_bytes())
    os.symlink(tmp / "outside.jsonl", folder / "linked.jsonl")
    _stage2_source(repo, "data/raw/instructions")
    return "source 'kocommercial_sample': data/raw/instructions/linked.jsonl resolves outside the repository root"


CASES: dict[str, Callable[[PipelineRepo, Path], str]] = {
    "empty file": empty_file,
    "wrong columns": wrong_columns,
    "formula cell": formula_cell,
    "path with ..": dotdot_path,
    "absolute path": absolute_path,
    "symlink out of the repo": symlink_out,
    "unmapped field next to a case variant": case_variant_column,
    "instruction records over the limit": instructions_over_the_limit,
    "eval pairs equal to a training source": eval_pairs_are_a_training_source,
    "symlink inside a source folder": symlink_in_folder,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_with_one_sentence_and_loses_nothing(
    pipeline_repo: PipelineRepo, tmp_path: Path, case: str
) -> None:
    repo = pipeline_repo
    before = repo.outputs()
    expected = CASES[case](repo, tmp_path)
    proc = repo.repro(check=False)
    assert proc.returncode != 0
    (err,) = kit.error_lines(proc.stderr)  # the stage's one sentence (DVC adds its own "failed to reproduce")
    assert err.startswith(expected), err
    assert "Traceback" not in proc.stderr
    assert repo.outputs() == before  # data/processed, reports, metrics and dvc.lock: untouched
    assert not kit.siblings(repo.path / "data/processed")


def _xlsx_bomb(path: Path, mib: int) -> None:
    """A zip whose one sheet inflates to ~`mib` MiB of a single row of cells (~1000:1)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr(
            "[Content_Types].xml",
            '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/'
            'package/2006/content-types"/>',
        )
        with zf.open("xl/worksheets/sheet1.xml", "w", force_zip64=True) as fh:
            fh.write(b'<worksheet><sheetData><row r="1">')
            cell = b'<c t="inlineStr"><is><t>A</t></is></c>' * 25_000  # ~1 MiB
            for _ in range(mib):
                fh.write(cell)
            fh.write(b"</row></sheetData></worksheet>")


def test_xlsx_bomb_is_refused_quickly_without_inflating_it(
    pipeline_repo: PipelineRepo, tmp_path: Path
) -> None:
    repo = pipeline_repo
    before = repo.outputs()
    bomb = repo.path / "data/raw/bomb.xlsx"
    _xlsx_bomb(bomb, 512)
    assert bomb.stat().st_size < 2 << 20
    _stage2_source(
        repo, "data/raw/bomb.xlsx", kind="xlsx", task="translation", fields={"ko": "원문", "en": "번역문"}
    )
    # dvc and the stage under a wrapper that reports the peak RSS of its children; killed as a group if slow.
    wrapper = (
        "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
        "sys.exit(rc)"
    )
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", wrapper, sys.executable, "-m", "dvc", "repro", "-s", "preprocess"],
        cwd=repo.path,
        env=kit.base_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("the xlsx bomb was not refused within 120 s") from None
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    (err,) = kit.error_lines(stderr)
    size = re.fullmatch(
        r"data/raw/bomb\.xlsx: uncompressed size (\d+\.\d) MB exceeds data\.max_xlsx_mb=50; "
        r"refusing to open it\.",
        err,
    )
    assert size and float(size[1]) > 400, err
    peak_mib = int(next(ln.split()[1] for ln in stderr.splitlines() if ln.startswith("MAXRSS_KB"))) / 1024
    assert peak_mib < 1536, (
        f"peak RSS {peak_mib:.0f} MiB"
    )  # the stage's usual footprint, not the 512 MiB sheet
    assert elapsed < 60, elapsed  # stage start-up (torch, tokenizer) dominates; the refusal itself is instant
    assert repo.outputs() == before


# Each row must fit model.max_seq_length=192 whole (SmolLM2 spends ~2 tokens per Hangul syllable):
# an answer is never cut, so an instruction row over the window is dropped as overlong_answer, which
# is not what these tests are about. The first row renders to 170 tokens.
CP949_ROWS = [  # instruction, input, output
    (
        "두통이 사흘째 계속되는 환자에게 먼저 확인할 것은 무엇인가요?",
        "",
        "발열과 신경학적 이상을 먼저 확인합니다.",
    ),
    (
        "환자 주민등록번호 800101-1234567 을 확인한 뒤 처방전을 발급해 주세요.",
        "",
        "본인 확인 후 처방전을 발급합니다.",
    ),
    (  # an RRN written without its hyphen (13 digits)
        "주민번호 9203152468024 로 보험 청구를 해 주세요.",
        "",
        "보험 청구를 접수했습니다.",
    ),
]


@pytest.fixture(scope="module")
def messy_run(pipeline_repo_session: PipelineRepo) -> dict:
    """One good `dvc repro` over inputs that need the documented handling: a CP949 CSV with an RRN and
    duplicate rows, and two reasoning records longer than model.max_seq_length."""
    import yaml

    repo = pipeline_repo_session
    assert repo.outputs() == repo.committed  # type: ignore[attr-defined]
    p = repo.path
    try:
        lines = ["instruction,input,output"] + [f'"{i}","{n}","{o}"' for i, n, o in CP949_ROWS]
        lines += [lines[1]] * 3  # three exact duplicates of the first row
        lines += [lines[1].replace(" ", "  ", 1)]  # equal to the first row only after normalisation
        (p / "data/raw/cp949.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode("cp949"))
        raw = yaml.safe_load((p / "params.yaml").read_text())
        raw["data"]["stage2"]["sources"].append(
            {"name": "cp949_csv", "kind": "csv", "path": "data/raw/cp949.csv", "task": "instruction"}
        )
        (p / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))
        # Two reasoning records over the window: one keeps about half of its CoT when cut to fit, one
        # would keep 2 % (below data.min_cot_keep_share, so it is dropped and counted as CoT lost).
        with (p / "data/samples/medical_reasoning.jsonl").open("a", encoding="utf-8") as f:
            for question, steps in (
                ("An overlong case: what is the first step for acute chest pain?", 15),
                ("A far overlong case: what is the first step for acute chest pain?", 300),
            ):
                cot = " ".join(
                    f"Step {i}: consider the differential and rule out a serious cause." for i in range(steps)
                )
                rec = {
                    "Question": question,
                    "Complex_CoT": cot,
                    "Response": "Obtain a 12-lead ECG within 10 minutes.",
                }
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        lock = (p / "dvc.lock").read_bytes()
        proc = repo.repro()
        processed = {
            f.relative_to(p / "data/processed").as_posix(): f.read_text(encoding="utf-8")
            for f in (p / "data/processed").rglob("*.jsonl")
        }
        reports = {f.name: f.read_text(encoding="utf-8") for f in (p / "reports").iterdir()}
        yield {
            "proc": proc,
            "metrics": json.loads((p / "metrics/data.json").read_text()),
            "processed": processed,
            "reports": reports,
            "lock_changed": (p / "dvc.lock").read_bytes() != lock,
            "status": repo.dvc("status", "preprocess").stdout,
            "verify": kit.verify(p),
        }
    finally:
        repo.reset()


def _records(run: dict, stage: str) -> list[dict]:
    return [
        json.loads(line)
        for split in ("train", "val")
        for line in run["processed"][f"{stage}/{split}.jsonl"].splitlines()
        if line.strip()
    ]


def test_cp949_csv_is_read_correctly(messy_run: dict) -> None:
    assert "data/raw/cp949.csv: decoded as CP949" in messy_run["proc"].stderr
    prompts = "\n".join(r["prompt"] for r in _records(messy_run, "stage2"))
    assert CP949_ROWS[0][0] in prompts  # Hangul intact, not mojibake
    assert messy_run["metrics"]["stage2.rows_in.cp949_csv"] == 7
    assert messy_run["lock_changed"] and "up to date" in messy_run["status"]
    assert messy_run["verify"].returncode == 0, messy_run["verify"].stdout


def test_duplicates_are_dropped_and_counted(messy_run: dict) -> None:
    m = messy_run["metrics"]
    assert m["stage2.duplicates.exact"] == 3 and m["stage2.duplicates.normalized"] == 1
    assert m["stage2.dropped.overlong"] == 0  # every CP949 row fits the window (see CP949_ROWS)
    assert m["stage2.rows_out.cp949_csv"] == 3
    prompts = [r["prompt"] for r in _records(messy_run, "stage2")]
    assert sum(CP949_ROWS[0][0] in p for p in prompts) == 1


def test_rrn_is_masked_by_default(messy_run: dict) -> None:
    """With and without the hyphen (YYMMDD-GNNNNNN and 13 digits in a row)."""
    assert messy_run["metrics"]["stage2.pii.rrn"] == 2
    everything = "\n".join(
        [*messy_run["processed"].values(), *messy_run["reports"].values(), json.dumps(messy_run["metrics"])]
    )
    assert "800101-1234567" not in everything and "1234567" not in everything
    assert "9203152468024" not in everything and "2468024" not in everything
    prompts = [r["prompt"] for r in _records(messy_run, "stage2")]
    assert any("******-*******" in p for p in prompts) and any("주민번호 ************* 로" in p for p in prompts)


def test_overlong_record_is_truncated_to_fit(messy_run: dict) -> None:
    m = messy_run["metrics"]
    assert m["stage1.truncated"] >= 1 and m["stage1.tokens_max"] <= 192
    (rec,) = [r for r in _records(messy_run, "stage1") if "An overlong case" in r["prompt"]]
    assert rec["completion"].endswith("Obtain a 12-lead ECG within 10 minutes.<|im_end|>")
    assert "</think>" in rec["completion"] and rec["n_tokens"] <= 192
    assert 0.25 <= m["stage1.cot_keep_share_min"] < 1  # about half of its CoT tokens (data/report: the share)
    assert "CoT tokens kept by the 1 records shortened to fit: mean" in messy_run["reports"]["data_report.md"]


def test_a_cot_that_would_keep_a_sliver_is_dropped_and_counted(messy_run: dict) -> None:
    m = messy_run["metrics"]
    assert not [r for r in _records(messy_run, "stage1") if "A far overlong case" in r["prompt"]]
    assert (m["stage1.dropped.overlong_cot"], m["stage1.cot_lost"], m["stage1.reasoning_records"]) == (
        1,
        1,
        332,
    )
    assert (m["stage1.records_lost.medical_o1_sample"], m["stage1.loss_share.medical_o1_sample"]) == (
        1,
        0.003,
    )
    assert (
        "WARNING kmed.data: data.stage1 source 'medical_o1_sample': 1 of 332 records (0.3%) would be lost"
        in messy_run["proc"].stderr
    )

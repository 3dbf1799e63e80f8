"""Throughput of the preprocess pipeline (read, normalise, PII scan, dedup, render, tokenize).

    .venv/bin/python bench/bench_preprocess.py [--jsonl-rows 200000] [--xlsx-rows 50000]

Builds, in a temporary directory, a JSONL in the medical-o1 schema (Question / Complex_CoT /
Response, lengths near the real data set's) and an .xlsx with ID / 원문 / 번역문, then times
kmed.data on them with the embedded SmolLM2 tokenizer and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kmed import data as D  # noqa: E402
from kmed.config import DataCfg, SourceCfg, StageDataCfg  # noqa: E402
from kmed.modeling import embedded_gguf, tokenizer_from_gguf  # noqa: E402

EN = (
    "patient presents with acute chest pain fever cough dyspnea hypotension tachycardia elevated troponin "
    "inferior infarction right ventricle preload nitrates contraindicated fluids reperfusion diagnosis "
    "likely because therefore however consider differential history examination laboratory imaging"
).split()
KO = (
    "환자 증상 두통 발열 기침 복통 진단 치료 약물 복용 검사 결과 병원 의사 간호사 처방 혈압 당뇨 "
    "오늘 어제 계속 심하게 조금 많이 아파요 있어요 합니다 주세요 드세요"
).split()


def words(rng: random.Random, vocab: list[str], n_chars: int, sep: str = " ") -> str:
    out: list[str] = []
    size = 0
    while size < n_chars:
        w = rng.choice(vocab)
        out.append(w)
        size += len(w) + 1
    return sep.join(out)


def make_jsonl(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {
                "Question": f"Case {i}: " + words(rng, EN, 350) + "?",
                "Complex_CoT": words(rng, EN, 1400),
                "Response": words(rng, EN, 600) + ".",
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_xlsx(path: Path, n: int) -> None:
    import openpyxl

    rng = random.Random(1)
    wb = openpyxl.Workbook(write_only=True)
    ws = wb.create_sheet("Sheet1")
    ws.append(["ID", "원문", "번역문"])
    for i in range(n):
        ws.append(
            [f"MED-{i:06d}", f"{i}번 " + words(rng, KO, 40) + ".", f"No. {i} " + words(rng, EN, 70) + "."]
        )
    wb.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jsonl-rows", type=int, default=200_000)
    ap.add_argument("--xlsx-rows", type=int, default=50_000)
    ap.add_argument("--max-seq-length", type=int, default=2048)
    args = ap.parse_args()

    tok = tokenizer_from_gguf(embedded_gguf(), args.max_seq_length)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        make_jsonl(root / "o1.jsonl", args.jsonl_rows)
        make_xlsx(root / "koen.xlsx", args.xlsx_rows)
        print(f"built fixtures in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        cases = [
            (
                "medical-o1 JSONL",
                args.jsonl_rows,
                SourceCfg(
                    name="o1",
                    kind="jsonl",
                    path="o1.jsonl",
                    task="reasoning",
                    fields={"question": "Question", "cot": "Complex_CoT", "answer": "Response"},
                ),
            ),
            (
                "AI Hub xlsx (both directions)",
                args.xlsx_rows,
                SourceCfg(
                    name="koen",
                    kind="xlsx",
                    path="koen.xlsx",
                    task="translation",
                    fields={"ko": "원문", "en": "번역문"},
                ),
            ),
        ]
        for label, n, src in cases:
            size_mb = (root / src.path).stat().st_size / 2**20
            t0 = time.perf_counter()
            rows, _ = D.read_source(src, root, max_xlsx_mb=500)
            t_read = time.perf_counter() - t0
            del rows
            scfg = StageDataCfg(sources=(src,), translation_direction="both")
            cfg = DataCfg(
                system_prompt="You are a medical expert. Think step by step.",
                stage1=scfg,
                stage2=scfg,
                eval={
                    "mcq": {"name": "m", "kind": "csv", "path": "x", "task": "mcq"},
                    "koen": {"name": "k", "kind": "jsonl", "path": "x", "task": "pairs"},
                },
            )
            t0 = time.perf_counter()
            sd = D.build_stage("stage", scfg, cfg, tok, args.max_seq_length, root, set())
            t_all = time.perf_counter() - t0
            recs = len(sd.train) + len(sd.val)
            tokens = sum(r["n_tokens"] for r in sd.train + sd.val)
            results.append((label, n, size_mb, t_read, t_all, recs, tokens))
            print(f"{label}: {t_all:.1f} s", file=sys.stderr)

    print(
        f"\npreprocess throughput on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, max_seq_length {args.max_seq_length}\n"
    )
    print(
        "| source | rows | file MB | read + normalise | rows/s | full pipeline | rows/s | records | tokens/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, n, mb, tr, ta, recs, tokens in results:
        print(
            f"| {label} | {n:,} | {mb:.0f} | {tr:.1f} s | {n / tr:,.0f} | {ta:.1f} s | {n / ta:,.0f} | {recs:,} | {tokens / ta:,.0f} |"
        )


if __name__ == "__main__":
    main()

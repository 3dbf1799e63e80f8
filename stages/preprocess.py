"""Preprocess: read the declared sources, check them, and write the SFT and eval data.

    python -m stages.preprocess

Reads `data:` and `model.max_seq_length` from params.yaml and the base tokenizer from models/base.
Writes data/processed/{stage1,stage2}/{train,val}.jsonl and data/processed/eval/{mcq,koen}.jsonl
(one directory, replaced atomically), metrics/data.json, reports/data_report.md and
reports/debug_samples.md. Any bad input exits 2 with one sentence naming the file, row and column;
so does a source that loses more than data.max_loss_share of its records, or all of them (allow_empty
aside). Nothing is written before every contract holds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kmed.config import load_params, resolved_dict
from kmed.data import build_datasets, data_report, debug_samples, ensure_defusedxml, write_outputs
from kmed.io import StageError, atomic_dir, run_stage, write_json, write_text_atomic

log = logging.getLogger("kmed.preprocess")

BASE_DIR = Path("models/base")
OUT_DIR = Path("data/processed")


def main() -> None:
    # Config: validated params, the resolved data section logged first.
    params = load_params()
    log.info("data config: %s", json.dumps(resolved_dict(params.data), ensure_ascii=False, sort_keys=True))
    log.info("model.max_seq_length: %d", params.model.max_seq_length)
    ensure_defusedxml()

    # Tokenizer of the base model: token lengths and the EOS that ends every completion.
    if not (BASE_DIR / "tokenizer_config.json").is_file():
        raise StageError(f"{BASE_DIR}: no tokenizer found; run `python -m stages.prepare_base` first.")
    from kmed.modeling import load_tokenizer

    tokenizer = load_tokenizer(BASE_DIR)
    log.info("tokenizer from %s: eos %r", BASE_DIR, tokenizer.eos_token)

    # Build everything in memory (every contract is checked before anything is written).
    built = build_datasets(params, tokenizer, Path.cwd())

    # Save: the data directory in one rename, then metrics and reports.
    with atomic_dir(OUT_DIR) as tmp:
        write_outputs(built, tmp)
    write_json("metrics/data.json", built.metrics)
    write_text_atomic("reports/data_report.md", data_report(params, built))
    write_text_atomic("reports/debug_samples.md", debug_samples(built.samples, tokenizer.eos_token))
    for rel, rows in sorted(built.files.items()):
        log.info("wrote %s/%s (%d rows)", OUT_DIR, rel, len(rows))


if __name__ == "__main__":
    run_stage(main)

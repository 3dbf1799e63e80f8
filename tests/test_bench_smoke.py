"""CPU smoke of bench/gpu_bench.py: build a tiny Qwen2, run the real sft stage through the harness
(hf backend, 2 steps), and check it produced a row with a finite tokens/s and a saved, reloadable adapter.
The GPU measurements themselves run on the device machine (bench/RESULTS.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gpu_bench.py"


@pytest.mark.integration
def test_gpu_bench_tiny_stage_row(tmp_path: Path) -> None:
    model, rows, wd = tmp_path / "model", tmp_path / "rows.jsonl", tmp_path / "wd"
    subprocess.run([sys.executable, str(BENCH), "build", "--shape", "tiny", "--out", str(model)],
                   check=True, cwd=ROOT, timeout=120)
    assert (model / "config.json").exists() and (model / "tokenizer.json").exists()
    proc = subprocess.run(
        [sys.executable, str(BENCH), "stage", "--shape", "tiny", "--model", str(model), "--backend", "hf",
         "--packing", "padding_free", "--lengths", "fixed", "--steps", "2", "--seq", "256", "--bs", "2",
         "--results", str(rows), "--workdir", str(wd), "--reload", "--timeout", "300", "--optim", "adamw_torch_fused"],
        cwd=ROOT, timeout=300, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads(rows.read_text().splitlines()[-1])
    assert row["rc"] == 0, row.get("error")
    assert row["kind"] == "stage" and row["backend"] == "hf" and row["shape"] == "tiny"
    # --optim reaches the stage's params (the 32B rows run the production recipe's optimizer this way)
    assert row["optim"] == "adamw_torch_fused"
    assert yaml.safe_load((wd / "params.yaml").read_text())["train"]["optim"] == "adamw_torch_fused"
    assert isinstance(row["tok_s"], float) and math.isfinite(row["tok_s"]) and row["tok_s"] > 0
    # Every row is exactly seq tokens: the probe counted real tokens, not pads.
    assert row["computed_tok_s"] == pytest.approx(row["tok_s"])
    assert row["loss_finite"] and row["adapter_saved"]
    assert row["batches"] == "padding-free"  # what train.packing resolved to, read from the stage's lineage
    assert (wd / "models/stage1/adapter/adapter_model.safetensors").exists()
    assert row["reload"]["peft"]["ok"], row["reload"]
    m = json.loads((wd / "metrics/sft-stage1.json").read_text())
    assert m["steps"] == 2

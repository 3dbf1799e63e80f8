"""kmed.report on a throwaway git+dvc repo: two real commits (and one DVC experiment) that differ in a
param, in metrics and in generations. The files are written by a stand-in script, not by training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmed.report import MARKER, ReportError, build_report
from tests.stagekit import ROOT

# Writes what the evaluate stage would, as a function of lora.r (no model involved).
FAKE_EVAL = '''import json, yaml
r = yaml.safe_load(open("params.yaml"))["lora"]["r"]
acc = {16: 0.25, 32: 0.375, 64: 0.5}[r]
json.dump({"stage2.mcq_acc": acc, "stage2.val_loss": 2.0 - acc, "base.mcq_acc": 0.2}, open("metrics/eval.json", "w"))
open("reports/eval.md", "w").write(
    "# Evaluation: base → stage 1 → stage 2\\n\\n| metric | base | stage2 |\\n|---|---|---|\\n"
    f"| mcq_acc | 0.2 | {acc} |\\n")
rows = [
    {"model": "stage2", "kind": "medical", "prompt": "What causes fever?",
     "output": f"<think>r={r} reasoning</think> Infection (r={r}).", "format_ok": True},
    {"model": "base", "kind": "medical", "prompt": "What causes fever?", "output": "Same | answer", "format_ok": False},
    {"model": "stage2", "kind": "ko2en", "prompt": "발열", "reference": "fever", "output": "fever" if r > 16 else "heat"},
]
open("reports/generations.jsonl", "w").write("".join(json.dumps(x, ensure_ascii=False) + "\\n" for x in rows))
'''

DVC_YAML = """stages:
  evaluate:
    cmd: python fake_eval.py
    deps: [fake_eval.py]
    params: [lora.r, train.learning_rate]
    metrics:
      - metrics/eval.json:
          cache: false
    outs:
      - reports/eval.md:
          cache: false
      - reports/generations.jsonl:
          cache: false
"""


def _sh(repo: Path, *cmd: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_GLOBAL": os.devnull,
           "DVC_GLOBAL_CONFIG_DIR": str(repo.parent / "dvc-global"), "DVC_SITE_CACHE_DIR": str(repo.parent / "site")}
    proc = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout.strip()


def _dvc(repo: Path, *args: str) -> str:
    return _sh(repo, sys.executable, "-m", "dvc", *args)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """main (lora.r 16) → feature (lora.r 32), both run and committed; experiment `r64` on feature."""
    repo = tmp_path_factory.mktemp("report") / "repo"
    (repo / "metrics").mkdir(parents=True)
    (repo / "reports").mkdir()
    _sh(repo, "git", "init", "-q", "-b", "main")
    _dvc(repo, "init", "-q")
    (repo / "fake_eval.py").write_text(FAKE_EVAL)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text("lora:\n  r: 16\ntrain:\n  learning_rate: 0.0002\n")
    _dvc(repo, "repro", "-q")
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "commit", "-qm", "baseline")
    _sh(repo, "git", "checkout", "-qb", "feature")
    (repo / "params.yaml").write_text("lora:\n  r: 32\ntrain:\n  learning_rate: 0.0002\n")
    _dvc(repo, "repro", "-q")
    _sh(repo, "git", "commit", "-qam", "lora.r 32")
    _dvc(repo, "exp", "run", "-q", "-n", "r64", "-S", "lora.r=64")
    _sh(repo, "git", "reset", "-q", "--hard")  # exp run leaves its results in the workspace
    return repo


def test_report_between_two_commits(repo: Path) -> None:
    md = build_report("main", "feature", repo)
    assert md.startswith(MARKER + "\n")
    # Params: the changed one, old and new.
    assert "| `lora.r` | 16 | 32 |" in md and "learning_rate" not in md
    # Metrics: changed ones with deltas and relative change; the unchanged one is left out.
    assert "| `eval:stage2.mcq_acc` | 0.25 | 0.375 | +0.125 | +50.0% |" in md
    assert "| `eval:stage2.val_loss` | 1.75 | 1.625 | -0.125 | -7.1% |" in md
    assert "base.mcq_acc" not in md.split("### Evaluation")[0]
    # The regression table at head, its H1 demoted.
    assert "| mcq_acc | 0.2 | 0.375 |" in md and "\n# Evaluation" not in md
    # Generations: the same prompt from base and head side by side, <think> kept visible, pipes escaped.
    assert "3 prompts in both; 2 answers changed." in md
    assert ("| &lt;think&gt;r=16 reasoning&lt;/think&gt; Infection (r=16). "
            "| &lt;think&gt;r=32 reasoning&lt;/think&gt; Infection (r=32). |") in md
    assert "| heat | fever |" in md and "**Reference:** fever" in md
    assert "Same &#124; answer" in md
    first_changed = md.index("· changed ·")
    assert first_changed < md.index("· same ·")  # changed answers come first


def test_report_against_workspace_and_experiment(repo: Path, tmp_path: Path) -> None:
    # A DVC experiment by name: its commit lives under refs/exps, read with git show.
    md = build_report("main", "r64", repo)
    assert "| `lora.r` | 16 | 64 |" in md and "| `eval:stage2.mcq_acc` | 0.25 | 0.5 | +0.25 | +100.0% |" in md
    assert "Infection (r=64)." in md
    # The workspace (uncommitted edit) as head, through the CLI.
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("learning_rate: 0.0002", "learning_rate: 0.0001"))
    try:
        out = tmp_path / "report.md"
        proc = subprocess.run([sys.executable, "-m", "kmed.report", "--base", "main", "--head", "workspace",
                               "--out", str(out), "--repo", str(repo)], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
        assert proc.returncode == 0, proc.stderr
        md = out.read_text()
        assert "→ the workspace" in md and "| `train.learning_rate` | 0.0002 | 0.0001 |" in md
        assert "| `lora.r` | 16 | 32 |" in md
    finally:
        _sh(repo, "git", "checkout", "--", "params.yaml")
    with pytest.raises(ReportError, match="neither a git revision nor a DVC experiment"):
        build_report("main", "no-such-exp", repo)


def test_pr_workflow_finds_its_comment_by_the_reports_marker() -> None:
    import yaml

    wf = yaml.safe_load((ROOT / ".github/workflows/pr-report.yml").read_text())
    assert "pull_request" in wf[True]  # YAML 1.1 reads the key `on` as True
    runs = "\n".join(s.get("run", "") for s in wf["jobs"]["report"]["steps"])
    assert "make setup" in runs and "python -m kmed.report" in runs and "--out report.md" in runs
    assert f"marker='{MARKER}'" in runs and "-X PATCH" in runs and "-F body=@report.md" in runs

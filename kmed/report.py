"""PR report: one markdown page comparing two git revisions or DVC experiments.

    python -m kmed.report --base origin/main --head workspace --out report.md
    python -m kmed.report --base main --head my-exp-name --out report.md

Sections: params diff (`dvc params diff`), metrics diff with deltas (`dvc metrics diff`), the evaluate
stage's regression table (reports/eval.md at head) and side-by-side generations on the same prompts
(reports/generations.jsonl at base vs head, joined on model, kind and prompt). A revision is anything
git resolves, or the name of a DVC experiment (refs/exps/…); `workspace` is the working tree.
Everything it reads is git-tracked (`cache: false`), so it needs no DVC remote.
"""

from __future__ import annotations

import argparse
import html
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- kmed-pr-report -->"  # the PR workflow finds its own comment by this line
WORKSPACE = "workspace"
EVAL_MD = "reports/eval.md"
GENERATIONS = "reports/generations.jsonl"
MAX_CHARS = 60_000  # a GitHub comment holds 65,536 characters


class ReportError(RuntimeError):
    """A revision that does not resolve, or a repository the report cannot read."""


# ---------------------------------------------------------------------------------------------
# Reading revisions
# ---------------------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def resolve(rev: str, repo: Path) -> str | None:
    """Commit sha of a git revision or a DVC experiment name; None for the workspace."""
    if rev == WORKSPACE:
        return None
    proc = _run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], repo)
    if proc.returncode == 0:
        return proc.stdout.strip()
    refs = _run(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"], repo).stdout
    hits = [line.split()[0] for line in refs.splitlines() if line.endswith(f"/{rev}") and "/stash" not in line]
    if len(hits) == 1:
        return hits[0]
    why = "is ambiguous (several experiments)" if hits else "is neither a git revision nor a DVC experiment"
    raise ReportError(f"{rev!r} {why}.")


def read_at(rev: str | None, path: str, repo: Path) -> str | None:
    """A file's text at a commit (`git show`) or in the workspace; None if it is not there."""
    if rev is None:
        p = repo / path
        return p.read_text(encoding="utf-8") if p.exists() else None
    proc = _run(["git", "show", f"{rev}:{path}"], repo)
    return proc.stdout if proc.returncode == 0 else None


def dvc_diff(kind: str, base: str, head: str | None, repo: Path) -> dict[str, Any]:
    """`dvc params|metrics diff base [head] --json`, flattened to {(file, key): {old, new, diff}}."""
    cmd = [sys.executable, "-m", "dvc", kind, "diff", base, *([head] if head else []), "--json"]
    proc = _run(cmd, repo)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ReportError(f"`dvc {kind} diff` failed: {last}")
    data = json.loads(proc.stdout or "{}")
    return {(f, k): v for f, keys in data.items() for k, v in sorted(keys.items())}


def generations(text: str | None) -> dict[tuple[str, str, str], dict[str, Any]]:
    rows = [json.loads(line) for line in (text or "").splitlines() if line.strip()]
    # Sampled evaluation writes k samples per prompt: the report compares the first (seed evaluate.seed).
    return {(r.get("model", "?"), r.get("kind", "?"), r.get("prompt", "")): r for r in rows if not r.get("sample")}


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def _num(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return f"`{v}`"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _cell(text: str, limit: int = 700) -> str:
    """Model output as one table cell: HTML-escaped (keeps `<think>` visible), newlines as <br>."""
    text = text if len(text) <= limit else text[:limit] + " …"
    return html.escape(text).replace("|", "&#124;").replace("\n", "<br>") or "<em>(empty)</em>"


def params_section(diff: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    if not diff:
        return ["No params changed.", ""]
    lines = ["| param | base | head |", "|---|---|---|"]
    for (f, key), v in diff.items():
        name = key if f == "params.yaml" else f"{f}:{key}"
        lines.append(f"| `{name}` | {_num(v.get('old'))} | {_num(v.get('new'))} |")
    return [*lines, ""]


def metrics_section(diff: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    if not diff:
        return ["No metrics changed.", ""]
    lines = ["| metric | base | head | Δ | Δ % |", "|---|---:|---:|---:|---:|"]
    for (f, key), v in diff.items():
        old, new, delta = v.get("old"), v.get("new"), v.get("diff")
        pct = f"{100 * delta / abs(old):+.1f}%" if isinstance(delta, int | float) and isinstance(old, int | float) \
            and old else "–"
        d = f"{delta:+.4g}" if isinstance(delta, int | float) else "–"
        lines.append(f"| `{Path(f).stem}:{key}` | {_num(old)} | {_num(new)} | {d} | {pct} |")
    return [*lines, ""]


def eval_section(text: str | None) -> list[str]:
    if text is None:
        return [f"No `{EVAL_MD}` at head (the evaluate stage has not run).", ""]
    # Its own H1 would outrank the report's headings.
    body = [("**" + line.lstrip("# ").strip() + "**") if line.startswith("# ") else line
            for line in text.strip().splitlines()]
    return [*body, ""]


def generations_section(base: dict, head: dict, limit: int) -> list[str]:
    shared = [k for k in head if k in base]
    if not head:
        return [f"No `{GENERATIONS}` at head.", ""]
    if not shared:
        return [f"No prompt in `{GENERATIONS}` is shared by base and head.", ""]
    changed = {k for k in shared if base[k].get("output") != head[k].get("output")}
    # Changed answers first, then the last model of the pipeline (stage2) before earlier ones.
    rank = {m: i for i, m in enumerate(dict.fromkeys(k[0] for k in head))}
    order = sorted(shared, key=lambda k: (k not in changed, -rank[k[0]]))
    n = len(changed)
    lines = [f"{len(shared)} prompts in both; {n} answer{'s' if n != 1 else ''} changed. "
             f"Showing {min(limit, len(order))}.", ""]
    for model, kind, prompt in order[:limit]:
        b, h = base[(model, kind, prompt)], head[(model, kind, prompt)]
        flag = "changed" if (model, kind, prompt) in changed else "same"
        title = html.escape(" ".join(prompt.split())[:90])
        lines += [f"<details><summary><b>{model}</b> · {kind} · {flag} · {title}</summary>", "",
                  f"**Prompt:** {_cell(prompt, 400)}", ""]
        if h.get("reference"):
            lines += [f"**Reference:** {_cell(str(h['reference']), 400)}", ""]
        lines += ["| base | head |", "|---|---|",
                  f"| {_cell(str(b.get('output', '')))} | {_cell(str(h.get('output', '')))} |", "", "</details>", ""]
    return lines


def build_report(base: str, head: str, repo: Path = Path("."), max_generations: int = 12) -> str:
    repo = repo.resolve()
    base_sha, head_sha = resolve(base, repo), resolve(head, repo)
    if base_sha is None:
        raise ReportError("--base must be a revision or an experiment, not the workspace.")
    head_label = f"`{head}` ({head_sha[:7]})" if head_sha else "the workspace"
    out = [MARKER, f"## kmed-r1 report: `{base}` ({base_sha[:7]}) → {head_label}", ""]

    sections: list[tuple[str, Any]] = [
        ("Params", lambda: params_section(dvc_diff("params", base_sha, head_sha, repo))),
        ("Metrics (changed, with deltas)", lambda: metrics_section(dvc_diff("metrics", base_sha, head_sha, repo))),
        ("Evaluation at head", lambda: eval_section(read_at(head_sha, EVAL_MD, repo))),
        ("Generations: base vs head, same prompts", lambda: generations_section(
            generations(read_at(base_sha, GENERATIONS, repo)), generations(read_at(head_sha, GENERATIONS, repo)),
            max_generations)),
    ]
    for title, make in sections:
        out.append(f"### {title}")
        out.append("")
        try:
            out += make()
        except ReportError as e:  # one broken section must not lose the rest of the report
            out += [f"_{e}_", ""]
    text = "\n".join(out)
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS] + "\n\n_(report truncated to fit a PR comment)_\n"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision or DVC experiment name")
    ap.add_argument("--head", default=WORKSPACE, help=f"git revision, DVC experiment name or {WORKSPACE!r}")
    ap.add_argument("--out", default="-", help="output file (default: stdout)")
    ap.add_argument("--max-generations", type=int, default=12, help="generation pairs shown")
    ap.add_argument("--repo", type=Path, default=Path("."), help="repository root")
    args = ap.parse_args(argv)
    try:
        text = build_report(args.base, args.head, args.repo, args.max_generations)
    except ReportError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

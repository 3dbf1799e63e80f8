"""The mutation table (tests/mutation/run.py) stays true: each edit still applies to the current tree, each
test it runs exists and is the one docs/reliability.md lists for the row, and every row of the killed
stages, bad inputs and security sections has a mutation. Cheap: nothing is mutated or run here."""

from __future__ import annotations

import re

from tests.mutation.run import MUTATIONS, ROOT

SECTIONS = ("Killed or failing stages", "Bad inputs", "Security")


def _rows() -> dict[str, str]:
    """{first cell: test cell} of docs/reliability.md's scenario rows in SECTIONS."""
    rows, section = {}, None
    for line in (ROOT / "docs/reliability.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):  # the scenarios table ends at the next heading
            section = None
        if not line.startswith("| "):
            continue
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        head = re.fullmatch(r"\*\*(.+?)\*\*.*", cells[0])
        if head:
            section = head[1]
        elif section in SECTIONS and len(cells) >= 2:
            rows[cells[0]] = cells[1]
    return rows


def test_every_edit_applies_once_to_the_current_tree() -> None:
    assert len({mut.name for mut in MUTATIONS}) == len(MUTATIONS)
    for mut in MUTATIONS:
        text = (ROOT / mut.file).read_text(encoding="utf-8")
        for old, new in mut.edits:
            assert text.count(old) == 1, (mut.name, old)
            assert old != new, mut.name


def test_every_listed_test_exists() -> None:
    for mut in MUTATIONS:
        for node in mut.tests:
            path, func = node.split("::")
            name, _, param = func.partition("[")
            source = (ROOT / path).read_text(encoding="utf-8")
            assert f"def {name}(" in source, (mut.name, node)
            assert not param or f'"{param.rstrip("]")}"' in source, (mut.name, node)


def test_every_row_has_a_mutation_run_against_its_listed_tests() -> None:
    rows = _rows()
    assert len(rows) >= 27, sorted(rows)  # the three sections were found
    for mut in MUTATIONS:
        (row,) = [r for r in rows if r.startswith(mut.row)] or [None]
        assert row is not None, f"{mut.name}: no row of docs/reliability.md starts with {mut.row!r}"
        for node in mut.tests:
            func = node.split("::")[1].split("[")[0]
            assert func in rows[row], f"{mut.name}: {func} is not a test that row lists"
    for row in rows:
        assert any(row.startswith(mut.row) for mut in MUTATIONS), f"no mutation breaks the protection of: {row}"

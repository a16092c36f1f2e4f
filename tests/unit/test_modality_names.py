"""Modality names live in netsurv.modalities: code compares against its constants, so that
renaming or adding a modality is one edit there (a test, as for the loss names)."""
from __future__ import annotations

import ast
from pathlib import Path

import netsurv
from netsurv import modalities

ROOT = Path(netsurv.__file__).parent
NAMES = set(modalities.BUILT_IN) | {modalities.WSI_MASK}


def _literal_uses(tree: ast.AST):
    """(line, source kind) of built-in modality names spelled as string literals in
    comparisons (``m == "wsi"``, ``"clinical" in mods``) or as subscripts (``batch["wsi"]``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                if isinstance(side, ast.Constant) and side.value in NAMES:
                    yield node.lineno, f"comparison with {side.value!r}"
        elif isinstance(node, ast.Subscript):
            s = node.slice
            if isinstance(node.value, ast.Name) and node.value.id == "metrics":
                continue  # metrics.json sections (e.g. "embeddings": the encoder used) are keys
            if isinstance(s, ast.Constant) and s.value in NAMES:
                yield node.lineno, f"subscript [{s.value!r}]"


def test_no_modality_string_comparisons_outside_modalities_module():
    found = []
    n_files = 0
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "modalities.py" and path.parent == ROOT:
            continue
        n_files += 1
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found += [f"{path.relative_to(ROOT.parent)}:{ln}: {what}"
                  for ln, what in _literal_uses(tree)]
    assert n_files > 50  # the scan saw the package
    assert not found, "use the constants of netsurv.modalities:\n" + "\n".join(found)


def test_the_check_finds_literals():
    src = 'if m == "wsi":\n    pass\nx = batch["clinical"]\ny = "radiomics" in mods\n'
    assert [w for _, w in _literal_uses(ast.parse(src))] == [
        "comparison with 'wsi'", "subscript ['clinical']", "comparison with 'radiomics'"]


def test_tabular_keeps_order_and_drops_bags():
    assert modalities.tabular(["wsi", "clinical", "radiomics"]) == ["clinical", "radiomics"]
    assert modalities.tabular(["wsi"]) == []

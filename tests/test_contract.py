"""helpers.contract: the names writers and readers of MLflow runs share, spelled once."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import contract

SRC = Path(__file__).resolve().parents[1] / "src" / "helpers"


def test_tags_and_kinds_are_distinct():
    tags = {k: v for k, v in vars(contract).items() if k.startswith("TAG_")}
    assert len(set(tags.values())) == len(tags)
    kinds = {v for k, v in vars(contract).items() if k.startswith("KIND_")}
    assert set(contract.MODEL_KINDS) <= kinds and len(kinds) >= 4


def test_metric_and_artifact_names():
    assert contract.metric(contract.PREFIX_TEST, "accuracy") == "test_accuracy"
    assert contract.predictions_path(contract.PREFIX_ZEROSHOT) == "predictions/zeroshot_test.csv"
    assert set(contract.THRESHOLD_METRICS) == {contract.PREFIX_TEST, contract.PREFIX_ZEROSHOT}


def test_no_module_spells_a_tag_of_its_own():
    """A tag literal ("tablora.xyz" or mlflow's own) outside contract.py would be a second
    spelling of one name: every other module imports it from here."""
    pattern = re.compile(
        r"""["'](tablora\.[a-z_]+|mlflow\.(?:parentRunId|source\.[a-z.]+|user|note\.content"""
        r"""|runColor|experimentKind|sharedViewState\.?[a-z]*))["']""")
    found = []
    for path in SRC.rglob("*.py"):
        if path.name == "contract.py":
            continue
        for m in pattern.finditer(path.read_text()):
            found.append(f"{path.relative_to(SRC)}: {m.group(1)}")
    assert not found, found


def test_contract_imports_nothing():
    import ast

    tree = ast.parse((SRC / "contract.py").read_text())
    imported = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [getattr(n, "module", None) for n in imported] == ["__future__"]

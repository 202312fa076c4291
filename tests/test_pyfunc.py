"""helpers.serving.pyfunc: the logged LLM classifier's spec and checks (the model itself, logged
by the evaluate notebook and loaded by MLflow, is tested end to end in tests/test_predict.py)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml

from helpers import contract, data
from helpers.config import load_params
from helpers.serving import pyfunc


@pytest.fixture
def prepared(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "name": "p", "scoring": "generate", "length_normalize": True, "eval_batch_size": 3,
        "prompt": {"answer_yes": "Oui", "answer_no": "Non", "system_prompt": "Be brief."},
        "dataset": {"source": "builtin:breast_cancer", "target": "target",
                    "positive_label": "malignant", "features": ["mean radius", "mean area"]}}))
    return data.prepare(load_params(path))


def test_the_spec_survives_its_json_file(prepared):
    spec = pyfunc.spec_for(prepared.params, prepared, math.nan, "")
    again = pyfunc.ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert math.isnan(again.threshold)  # generate mode: no threshold (JSON null)
    assert again.recipe == spec.recipe and again.model_id == prepared.params.model_id
    # What the scoring code reads comes back as the run's settings.
    p = again.params()
    assert (p.scoring, p.length_normalize, p.eval_batch_size) == ("generate", True, 3)
    assert (p.prompt.answer_yes, p.prompt.answer_no) == ("Oui", "Non")
    meta = spec.metadata()
    assert meta["kind"] == contract.KIND_LLM and meta["threshold"] is None
    assert meta["features"] == ["mean radius", "mean area"]


def test_the_recipe_gives_the_evaluation_messages(prepared):
    spec = pyfunc.spec_for(prepared.params, prepared, 0.4, contract.THRESHOLD_VALID)
    classifier = pyfunc.LLMClassifier(spec, model=None, tokenizer=None)
    X = prepared.X("test")
    assert classifier.messages(X) == prepared.messages("test", False)


@pytest.mark.parametrize("columns,rows,words", [
    (["mean radius"], 2, "missing feature column(s) 'mean area'"),
    (["mean radius", "mean area"], 0, "no rows"),
])
def test_columns_are_checked_in_one_line(columns, rows, words):
    table = pd.DataFrame({c: [1.0] * rows for c in columns})
    with pytest.raises(pyfunc.PredictError) as e:
        pyfunc.check_columns(table, ["mean radius", "mean area"], "new.csv")
    assert words in str(e.value) and "\n" not in str(e.value)

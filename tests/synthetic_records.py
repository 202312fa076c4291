"""Hand-built three-class RunRecords (no MLflow) shared by the report, figures and recommend
tests: `record3(name, kind, wrong, seed)` gets `wrong` of N rows wrong."""

from __future__ import annotations

import numpy as np

from helpers import contract, metrics
from helpers.analysis.records import RunRecord

N = 100
CLASSES = ["ant", "bee", "cat"]
LABELS3 = np.arange(N) % 3


def record3(name: str, kind: str, wrong: int, seed: int = 0) -> RunRecord:
    """A three-class model that gets `wrong` rows wrong, with its predictions as logged."""
    rng = np.random.default_rng(seed)
    pred = LABELS3.copy()
    flip = rng.choice(N, wrong, replace=False)
    pred[flip] = (pred[flip] + 1) % 3
    proba = np.full((N, 3), 0.1)
    proba[np.arange(N), pred] = 0.8
    frame = metrics.predictions_frame_multi(LABELS3, pred, proba, list(range(N)), CLASSES)
    values = metrics.summary_multi(LABELS3, pred, proba, CLASSES, n_bootstrap=200)
    return RunRecord(name=name, kind=kind, predictions=frame, metrics=values,
                     tags={contract.THRESHOLD_SOURCE_TAGS["test"]: contract.THRESHOLD_ARGMAX})

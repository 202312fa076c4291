"""helpers.analysis.recommend: each rule on hand-built run records, and the next round's params
files."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import config
from helpers.analysis import recommend as rec
from helpers.analysis import report
from helpers.analysis.records import RunRecord
from helpers.config import load_params

# A healthy model: gains from fine-tuning, balanced, converged, not overfitting.
HEALTHY = {"test_accuracy": 0.70, "zeroshot_test_accuracy": 0.50, "test_recall": 0.70,
           "test_specificity": 0.70, "test_balance_gap": 0.0, "test_positive_rate": 0.5,
           "test_f1": 0.7}
FLAT_LOSS = [(s, 1.0 + 0.01 * (-1) ** s) for s in range(10, 210, 10)]  # noise around 1.0
GOOD_VAL = [(50, 1.2), (100, 1.0), (150, 0.95), (200, 0.94)]


def record(name: str = "m", size: str = "", params: dict | None = None, **metrics) -> RunRecord:
    m = {**HEALTHY, **{f"test_{k}" if not k.startswith(("test_", "zeroshot_")) else k: v
                       for k, v in metrics.items()}}
    return RunRecord(name=name, metrics=m, model_size=size,
                     history={"train_loss": FLAT_LOSS, "val_loss": GOOD_VAL},
                     params=params if params is not None else {
                         "name": name, "model_id": f"org/{name}", "learning_rate": 1e-5,
                         "num_iters": 200, "batch_size": 2, "lora_rank": 8,
                         "lora_alpha": 16.0, "threshold_mode": "fixed"})


def fired(r: RunRecord) -> set[str]:
    return {f.rule for f in rec.diagnose([r])[r.name]}


def test_healthy_model_fires_nothing():
    assert fired(record()) == set()


def test_no_gain():
    assert "no_gain" in fired(record(zeroshot_test_accuracy=0.69))  # +1 point
    assert "no_gain" in fired(record(zeroshot_test_accuracy=0.75))  # worse than zero-shot
    assert "no_gain" not in fired(record(zeroshot_test_accuracy=0.67))  # +3 points
    assert "no_gain" not in fired(record(zeroshot_test_accuracy=float("nan")))
    f = rec.rule_no_gain(record(zeroshot_test_accuracy=0.70))
    assert "zero-shot 70.0% → fine-tuned 70.0% (+0.0 points" in f.evidence
    assert {c.key for c in f.changes} == {"learning_rate", "num_iters", "lora_rank", "lora_alpha"}


def test_bias_says_yes_or_no_to_everything():
    yes = rec.rule_bias(record(positive_rate=0.95))
    assert yes.title == "says Yes to everything" and "95.0%" in yes.evidence
    assert rec.rule_bias(record(positive_rate=0.05)).title == "says No to everything"
    assert rec.rule_bias(record(positive_rate=0.9)) is None
    assert rec.rule_bias(record(positive_rate=0.1)) is None
    # Already a tuned threshold: the change is to learn more instead.
    tuned = record(positive_rate=0.97, params={"model_id": "x", "threshold_mode": "tune"})
    assert {c.key for c in rec.rule_bias(tuned).changes} == {"learning_rate", "num_iters"}


def test_bias_from_predictions_when_the_metric_is_missing():
    import pandas as pd

    r = record()
    del r.metrics["test_positive_rate"]
    r.predictions = pd.DataFrame({"row_id": range(10), "label": [0, 1] * 5,
                                  "prediction": [1] * 10})
    assert rec.rule_bias(r).title == "says Yes to everything"


def test_balance_gap():
    f = rec.rule_balance_gap(record(recall=0.9, specificity=0.5, balance_gap=0.4))
    assert f is not None and "gap 40.0 points" in f.evidence
    assert rec.rule_balance_gap(record(recall=0.6, specificity=0.75, balance_gap=0.15)) is None


def test_too_conservative():
    f = rec.rule_too_conservative(record(recall=0.278, specificity=0.783))
    assert f.title == "too conservative" and "27.8%" in f.evidence
    assert rec.rule_too_conservative(record(recall=0.45, specificity=0.9)) is None  # recall ok
    assert rec.rule_too_conservative(record(recall=0.2, specificity=0.5)) is None  # spec low


def test_not_converged():
    r = record()
    r.history["train_loss"] = [(s, 2.0 - 0.005 * s) for s in range(10, 210, 10)]
    f = rec.rule_not_converged(r)
    assert f is not None and f.changes[0].key == "num_iters"
    # Falling early, flat at the end: converged.
    r.history["train_loss"] = [(s, max(2.0 - 0.02 * s, 1.0)) for s in range(10, 210, 10)]
    assert rec.rule_not_converged(r) is None
    # Noise without a trend, and too few points, do not fire.
    rng = np.random.default_rng(0)
    r.history["train_loss"] = [(s, 1.0 + 0.05 * rng.standard_normal()) for s in range(0, 400, 4)]
    assert rec.rule_not_converged(r) is None
    r.history["train_loss"] = [(10, 2.0), (20, 1.5), (30, 1.0)]
    assert rec.rule_not_converged(r) is None


def test_overfitting():
    r = record()
    r.history["val_loss"] = [(50, 1.2), (100, 0.9), (150, 1.0), (200, 1.1)]
    f = rec.rule_overfitting(r)
    assert f is not None and "minimum 0.900 at step 100" in f.evidence
    assert f.changes == (rec.set_to("num_iters", 100),)
    r.history["val_loss"] = [(50, 1.2), (100, 0.9), (150, 0.92), (200, 0.93)]  # within 5%
    assert rec.rule_overfitting(r) is None
    r.history["val_loss"] = [(1, 0.8), (100, 0.9), (200, 1.1)]  # worse from the start
    assert rec.rule_overfitting(r).changes == (rec.times("learning_rate", 0.5),)


def test_smaller_beats_larger():
    small = record("llama-3b", size="3B", accuracy=0.54)
    large = record("llama-8b", size="8B", accuracy=0.475)
    found = rec.rule_smaller_beats_larger([small, large])
    assert [f.model for f in found] == ["llama-8b"]
    assert "llama-3b (3B) 54.0% vs llama-8b (8B) 47.5%" in found[0].evidence
    # Within the margin, or the larger one ahead, or sizes unknown: nothing.
    assert rec.rule_smaller_beats_larger([small, record("l8", size="8B", accuracy=0.53)]) == []
    assert rec.rule_smaller_beats_larger([record("s", size="3B", accuracy=0.4), large]) == []
    assert rec.rule_smaller_beats_larger([record("p", size="mini", accuracy=0.9), large]) == []


def test_merge_changes_keeps_the_larger_factor_and_later_set_values():
    a = rec.Finding("a", "a", "m", "", (rec.times("num_iters", 1.5), rec.times("lora_rank", 2)),
                    "")
    b = rec.Finding("b", "b", "m", "", (rec.times("num_iters", 2.0),), "")
    c = rec.Finding("c", "c", "m", "", (rec.set_to("num_iters", 100),), "")
    assert rec.merge_changes([a, b])["num_iters"].factor == 2.0
    assert rec.merge_changes([a, b, c])["num_iters"] == rec.set_to("num_iters", 100)
    new, lines = rec.apply_changes({"num_iters": 600, "learning_rate": 8e-7, "lora_rank": 8},
                                   {"num_iters": rec.times("num_iters", 1.5),
                                    "learning_rate": rec.times("learning_rate", 2.5)})
    assert new == {"num_iters": 900, "learning_rate": 2e-6, "lora_rank": 8}
    assert "num_iters: 600 → 900 (×1.5)" in lines


def test_next_name():
    assert rec.next_name("Mistral-7B") == "Mistral-7B-v2"
    assert rec.next_name("Mistral-7B-v2") == "Mistral-7B-v3"


def _round() -> report.Comparison:
    best = record("llama-3b", size="3B", accuracy=0.542, zeroshot_test_accuracy=0.389)
    best.metrics.update(train_seconds=600.0, tokens_per_sec=400.0)
    bad = record("llama-8b", size="8B", accuracy=0.475, recall=0.278, specificity=0.783,
                 balance_gap=0.505, zeroshot_test_accuracy=0.389)
    bad.params.update(seeds=[0, 1], dataset={"test_size": 0.25})
    bad.metrics.update(train_seconds=1200.0)
    fine = record("phi-mini", size="mini", accuracy=0.508, zeroshot_test_accuracy=0.30)
    return report.build([best, bad, fine])


def test_plan_and_files_load(tmp_path):
    c = _round()
    plan = rec.plan(c)
    assert [r.name for r in plan.config_a] == ["llama-8b-v2"]
    assert [r.name for r in plan.config_b] == ["llama-3b-v2"]
    assert plan.keep == ["phi-mini"]
    written = rec.write(plan, c, tmp_path / "next")
    a, b = tmp_path / "next" / "config-a", tmp_path / "next" / "config-b"
    assert (a / "_defaults.yaml").is_file() and (a / "llama-8b-v2.yaml").is_file()
    assert (b / "llama-3b-v2.yaml") in written and (tmp_path / "next" / "REPORT.md") in written
    p8 = load_params(a / "llama-8b-v2.yaml")
    assert (p8.name, p8.model_id, p8.learning_rate) == ("llama-8b-v2", "org/llama-8b", 2e-5)
    assert (p8.lora_rank, p8.lora_alpha, p8.dataset.balance) == (16, 32.0, "oversample")
    assert p8.threshold_mode == "tune" and p8.dataset.test_size == 0.25 and p8.seeds == [0, 1]
    p3 = load_params(b / "llama-3b-v2.yaml")
    assert (p3.lora_rank, p3.batch_size, p3.num_iters) == (16, 4, 300)
    text = (a / "llama-8b-v2.yaml").read_text()
    assert text.startswith(rec.MARKER)
    assert "too conservative" in text and "a smaller model beats it" in text
    # 1200 s for 200 x 2 examples; now 200 x 2 again, two seeds -> 40 min.
    assert "Expected wall time: ~40 min of training" in text
    # 600 s for 200 x 2; pushed to 300 x 4 -> 3x the examples -> 30 min.
    assert "~30 min of training" in (b / "llama-3b-v2.yaml").read_text()
    # The model file holds only what differs from the defaults (e.g. not max_seq_length).
    assert "max_seq_length" not in text and "max_seq_length" in (a / "_defaults.yaml").read_text()
    assert not list((tmp_path / "next").rglob("*.tmp"))
    md = (tmp_path / "next" / "REPORT.md").read_text()
    assert "## Recommendations" in md and "tablora batch" in md and "## Summary for a README" in md


def test_rewrite_removes_only_our_stale_files(tmp_path):
    c = _round()
    out = tmp_path / "next"
    rec.write(rec.plan(c), c, out)
    (out / "config-a" / "old-v2.yaml").write_text(rec.MARKER + "\nname: old-v2\n")
    (out / "config-a" / "mine.yaml").write_text("name: mine\n")
    rec.write(rec.plan(c), c, out)
    assert not (out / "config-a" / "old-v2.yaml").exists()
    assert (out / "config-a" / "mine.yaml").exists()


def test_no_train_seconds_gives_unknown_time():
    r = record()
    seconds, note = rec.estimate_seconds(r, {"num_iters": 10, "batch_size": 1},
                                         {"num_iters": 20, "batch_size": 1})
    assert seconds is None and "unknown" in note


def test_params_round_trip_from_mlflow_strings(tmp_path):
    """What tracking.log_params logs (strings, repr of lists) comes back as a loadable file."""
    import yaml

    from helpers.config import DatasetSpec, Params

    p = Params(name="x", learning_rate=8e-7, seeds=[0, 1], lora_alpha=32.0, num_epochs=2.5,
               dataset=DatasetSpec(positive_label="malignant", value_labels={"a": {0: "no"}}))
    flat = {k: str(v if not isinstance(v, (list, dict)) else repr(v))
            for k, v in p.flat().items()} | {"lora_scale": "4.0"}
    back = config.params_from_flat(flat)
    assert back["learning_rate"] == 8e-7 and back["seeds"] == [0, 1] and "lora_scale" not in back
    assert back["dataset"]["positive_label"] == "malignant" and back["num_epochs"] == 2.5
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(back))
    assert load_params(tmp_path / "x.yaml") == p


def test_a_run_budgeted_in_epochs_gets_more_epochs_not_steps():
    changes = {"num_iters": rec.times("num_iters", 1.5)}
    new, lines = rec.apply_changes({"num_iters": 0, "num_epochs": 2.0, "batch_size": 4}, changes)
    assert (new["num_iters"], new["num_epochs"]) == (0, 3.0)
    assert lines == ["num_epochs: 2.0 → 3.0 (×1.5)"]
    new, _ = rec.apply_changes({"num_iters": 0, "num_epochs": 2.0},
                               {"num_iters": rec.set_to("num_iters", 120)})
    assert (new["num_iters"], new["num_epochs"]) == (120, 0.0)
    r = RunRecord("m", metrics={"train_seconds": 100.0, "train_steps": 200})
    seconds, note = rec.estimate_seconds(r, {"num_iters": 0, "num_epochs": 2.0, "batch_size": 4},
                                         {"num_iters": 0, "num_epochs": 3.0, "batch_size": 4})
    assert seconds == pytest.approx(150) and "300 iters" in note


def test_a_multiclass_model_on_one_class_is_told_to_learn_more():
    # Regression: class indices were read as 0/1 predictions ("says Yes to everything").
    from synthetic_records import record3

    from helpers import metrics

    good = record3("tiny", "llm", 10)
    assert rec.rule_bias(good) is None
    stuck = record3("tiny", "llm", 0)
    y = stuck.predictions["label"].to_numpy()
    stuck.predictions = metrics.predictions_frame_multi(y, np.full(len(y), 1), None,
                                                        list(range(len(y))), ["ant", "bee", "cat"])
    f = rec.rule_bias(stuck)
    assert f.title == "says one class to everything" and "predicts bee for 100.0%" in f.evidence
    assert {c.key for c in f.changes} == {"learning_rate", "num_iters"}  # no oversampling
    assert rec.rule_balance_gap(stuck) is None and rec.rule_too_conservative(stuck) is None

"""The contract between the code that writes MLflow runs and the code that reads them.

Every run kind, tag, metric name and artifact path that more than one module uses is spelled here
once; writers (tracking, finetune, evaluate, baselines, batch) and readers (analysis, predict)
import these names. A run of tablora is:

    tags       tablora.kind (one of KINDS), tablora.model_name, tablora.seed, tablora.split_hash,
               tablora.params_hash, tablora.batch_id, mlflow.parentRunId (nested in a batch) ...
    metrics    <prefix>_<metric> for each scored model (prefix "test" for the fine-tuned LLM or
               the baseline, "zeroshot_test" for the LLM before fine-tuning), with 95% bootstrap
               bounds <prefix>_<metric>_ci_low / _ci_high; train_loss / val_loss per step
    artifacts  predictions/<prefix>.csv (row_id,label,p_yes,prediction[,raw]), adapters/,
               params/, figures/, notebooks/, data/

Nothing here imports anything: every module may import it.
"""

from __future__ import annotations

# The splits of a table (helpers.data), as dataset inputs and in metric names.
SPLITS = ("train", "valid", "test")

# ---------------------------------------------------------------- run kinds (tag tablora.kind)
KIND_LLM = "llm"  # one params file at one seed: training + zero-shot and fine-tuned evaluation
KIND_BASELINE = "baseline"  # one classical model on one split
KIND_BATCH = "batch"  # the parent run of `tablora batch`
KIND_REPORT = "report"  # a comparison logged outside a batch
KIND_TUNE = "tune"  # the parent run of a `tablora tune` study
# One trial of a study: trained and scored on validation rows; not a model of the comparison
# (picking the best of them by test scores would select on the test split).
KIND_TRIAL = "trial"
KIND_MEMCHECK = "memcheck"  # has the model seen the table? (helpers.llm.memcheck)
MODEL_KINDS = (KIND_LLM, KIND_BASELINE)  # the runs a comparison reads
# The baselines that know nothing about the rows (helpers.baselines): every other model is
# tested against the better of them, and one not significantly better is "no better than the
# floor" in every verdict.
FLOORS = ("majority", "stratified")

# ---------------------------------------------------------------- tags
TAG_KIND = "tablora.kind"
TAG_MODEL_NAME = "tablora.model_name"  # the params name (or baseline name), without seed suffix
TAG_SEED = "tablora.seed"
TAG_SPLIT_HASH = "tablora.split_hash"  # which rows are train/valid/test (helpers.data)
TAG_PARAMS_HASH = "tablora.params_hash"  # the resolved params (batch --resume)
TAG_BATCH_ID = "tablora.batch_id"
TAG_MODEL_FAMILY = "tablora.model_family"
TAG_MODEL_SIZE = "tablora.model_size"
TAG_ERROR = "tablora.error"  # why a run FAILED, one line
TAG_ERROR_CELL = "tablora.error_cell"  # the first line of the notebook cell that failed
TAG_PLAN_HASH = "tablora.plan_hash"  # which batch command a parent run ran (--resume)
TAG_BASELINES_KEY = "tablora.baselines_key"  # which split group a baselines run belongs to
TAG_TASK = "tablora.task"  # the batch task a run was made by: every attempt of it carries it
TAG_WORKER = "tablora.worker"  # where the run ran: the Dask worker's address, host and pid
TAG_ADAPTER_DIR = "tablora.adapter_dir"  # the adapter an evaluation scored
TAG_STOPPED_EARLY = "tablora.stopped_early"
# "true" when training ended by its budget while validation loss was still falling.
TAG_STILL_IMPROVING = "tablora.still_improving"

# A baseline fitted with fixed settings because CV could not run on its rows (why, in words).
TAG_FALLBACK = "tablora.fallback"
# Learning curves (`tablora curve`): the parent run carries TAG_CURVE (its sizes, "8,32,all"),
# every point's runs (the LLM's and the baselines') TAG_TRAIN_ROWS, the rows they learned from.
TAG_CURVE = "tablora.curve"
TAG_TRAIN_ROWS = "tablora.train_rows"
# The curve's analysis, logged to its parent run (curve.md, curve.json, the figures).
ARTIFACT_CURVE = "curve"
TAG_STUDY = "tablora.study"  # the Optuna study a tune or trial run belongs to
TAG_TRIAL = "tablora.trial"  # the trial's number in its study
TAG_TRIAL_STATE = "tablora.trial_state"  # COMPLETE, PRUNED or FAIL (Optuna's TrialState)
TAG_BEST_TRIAL = "tablora.best_trial"  # on a tune run: the best trial's number and run id

TAG_DATA_SOURCE = "tablora.source"  # on the logged dataset inputs
TAG_OWNER = "tablora.owner"  # "host:pid" of the process a RUNNING run lives and dies with
TAG_HEARTBEAT = "tablora.heartbeat"  # unix time, refreshed while that process works on the run
TAG_NOTE_HASH = "tablora.note_hash"  # the description tablora wrote (a user's edit is kept)
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_PARENT = "mlflow.parentRunId"
# MLflow's own tags, as its UI reads them: the run's "Source", "Created by" and "Description"
# columns, and the colour it draws the run in (one colour per model, as in the figures).
TAG_SOURCE_NAME = "mlflow.source.name"
TAG_SOURCE_TYPE = "mlflow.source.type"
TAG_USER = "mlflow.user"
TAG_NOTE = "mlflow.note.content"  # markdown
TAG_RUN_COLOR = "mlflow.runColor"
SOURCE_TYPE = "LOCAL"  # shown as the source's file name

# ---------------------------------------------------------------- experiment tags
# MLflow's experiment kind: "custom_model_development" is its model-training ("Machine
# learning") kind, not the GenAI one with Traces and Judges.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# A saved runs-table view (sort, columns) that the UI opens from `?viewStateShareKey=<name>`.
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
SHARED_VIEW = "tablora"
# The UI's own switch between its GenAI and model-training views (a URL parameter).
UI_WORKFLOW = "workflowType=machine_learning"
TAG_MEMCHECK_TEXT = "tablora.memcheck_text"  # which text of the table: file | pandas
TAG_MEMCHECK_FLAGGED = "tablora.memcheck_flagged"  # the tests that flagged it, or "none"
TAG_MEMCHECK_KEY = "tablora.memcheck_key"  # model + table text + settings (reused by a batch)

# ---------------------------------------------------------------- metrics
PREFIX_TEST = "test"  # the fine-tuned LLM, or a baseline, on the test split
PREFIX_ZEROSHOT = "zeroshot_test"  # the LLM before fine-tuning, on the same rows
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"
# The decision threshold of each scored model, logged as a metric.
THRESHOLD_METRICS = {PREFIX_TEST: "threshold", PREFIX_ZEROSHOT: "zeroshot_threshold"}
# How each scored model's threshold was chosen (a tag: an evaluation may run again), its values
# and their words in the report.
THRESHOLD_SOURCE_TAGS = {PREFIX_TEST: "tablora.threshold_source",
                         PREFIX_ZEROSHOT: "tablora.zeroshot_threshold_source"}
THRESHOLD_FIXED, THRESHOLD_VALID, THRESHOLD_OOF = "fixed", "valid", "oof"
THRESHOLD_SOURCES = {THRESHOLD_FIXED: "fixed", THRESHOLD_VALID: "tuned on valid",
                     THRESHOLD_OOF: "tuned out-of-fold"}
# A multi-class task has no threshold: each model predicts its most likely class.
THRESHOLD_ARGMAX = "argmax"
THRESHOLD_SOURCES[THRESHOLD_ARGMAX] = "none: the most likely class"
# Per-step training curves (mlx-lm's report keys, with units spelled out: see tracking).
TRAIN_LOSS, VAL_LOSS = "train_loss", "val_loss"
TOKENS_PER_SEC = "tokens_per_sec"
TRAIN_SECONDS = "train_seconds"
TRAIN_STEPS = "train_steps"  # the training budget in steps (num_epochs resolved)
# A trial's score on the validation rows (tune.objective: val_loss or valid_<metric>), and on
# a tune run the best trial's, with the counts of trials by state.
OBJECTIVE = "objective"
BEST_OBJECTIVE = "best_objective"


def metric(prefix: str, name: str) -> str:
    """metric("test", "accuracy") -> "test_accuracy"."""
    return f"{prefix}_{name}"


# Memorization checks (kind memcheck): memcheck_<test>_<what>, what one of exact, near, trials,
# chance_exact, chance_near, chance_trials (the shuffled copy), p, flagged (0/1); plus
# memcheck_header_verbatim_chars and memcheck_flagged (1 when any test flagged the table).
MEMCHECK_TESTS = ("header", "row", "feature", "first_token")
MEMCHECK_FLAGGED = "memcheck_flagged"


def memcheck_metric(test: str, what: str) -> str:
    """memcheck_metric("row", "exact") -> "memcheck_row_exact"."""
    return f"memcheck_{test}_{what}"


# ---------------------------------------------------------------- artifacts
ARTIFACT_PARAMS = "params"  # the params file(s) a run was made from
ARTIFACT_NOTEBOOKS = "notebooks"  # the executed notebooks
ARTIFACT_FIGURES = "figures"
ARTIFACT_DATA = "data"  # the split file
ARTIFACT_ADAPTERS = "adapters"  # the best adapter (lowest validation loss)
ARTIFACT_ADAPTERS_LAST = "adapters_last"  # the adapter after the last step
ARTIFACT_COMPARISON = "comparison"  # REPORT.md and its figures, on a batch or report run
ARTIFACT_STUDY = "study"  # on a tune run: the best params file and the trials table
ERROR_FILE = "error.txt"
EVALUATION_SETTINGS = "evaluation/settings.json"
ARTIFACT_MEMCHECK = "memcheck/completions.json"  # every prompt, target and completion
SUMMARY_JSON, SUMMARY_TEXT = "summary.json", "summary.txt"
# Bookkeeping of the data a run used (rows and classes per split, prompt tokens, duplicates):
# one JSON file, not metrics, so that the runs table lists the results first.
DATA_SUMMARY = "data/summary.json"
REPORT_MD, REPORT_HTML = "REPORT.md", "REPORT.html"  # REPORT.html: figures embedded
# The run's logged MLflow model (helpers.serving): a pyfunc for the fine-tuned LLM, scikit-learn
# for a baseline; registered under the params name (the baseline's name). Its metadata key
# MODEL_METADATA holds what `tablora predict` needs (kind, features, target, threshold, ...).
ARTIFACT_MODEL = "model"
MODEL_METADATA = "tablora"
MODEL_SPEC_FILE = "tablora_model.json"  # the pyfunc's resolved prompt recipe and settings

# Adapter folders (on disk and in the artifacts): what mlx-lm's load_adapters reads.
ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_FILE, ADAPTER_CONFIG)


def predictions_path(prefix: str) -> str:
    """predictions/test.csv, predictions/zeroshot_test.csv: row_id,label,p_yes,prediction[,raw]."""
    return f"predictions/{prefix}.csv"


PREDICTION_COLUMNS = ("row_id", "label", "p_yes", "prediction")
# A multi-class run's predictions: label and prediction are class indices, p_yes is empty, and
# each row also has its class names and P(class) per class index: ...,label_name,
# prediction_name,p_0,...,p_<K-1>[,raw].
LABEL_NAME, PREDICTION_NAME = "label_name", "prediction_name"
CLASS_PROBABILITY = "p_{}"  # .format(class index) in the predictions; (class) in pyfunc output

# ---------------------------------------------------------------- environment
# Set by `tablora batch` for the notebooks it runs (kernels inherit the environment): every run a
# notebook starts on its own (the baselines, the comparison) joins the batch and nests under it.
ENV_BATCH_ID = "TABLORA_BATCH_ID"
ENV_PARENT_RUN_ID = "TABLORA_PARENT_RUN_ID"
# Set by helpers.workflow.notebooks.execute: the runs a notebook opens are listed in this file,
# one id a line, so that the executed notebook can be attached to them once the kernel is done.
ENV_RUN_IDS_FILE = "TABLORA_RUN_IDS_FILE"
# Set by a batch task on a worker: a JSON object of tags that every run its notebooks start carry
# (the task, the worker, the baselines key), since those runs are made inside the kernel.
ENV_RUN_TAGS = "TABLORA_RUN_TAGS"
# Set by helpers.workflow.notebooks.execute: "host:pid" of the command that started the kernel,
# the owner (TAG_OWNER) of the runs the kernel opens.
ENV_OWNER = "TABLORA_OWNER"

# ---------------------------------------------------------------- errors
# Exceptions whose message is written for the user (it names the file, key, column or run and
# the fix): every command prints that message as one `error:` line and exits 2, whether it was
# raised in the command's process or inside a notebook kernel (where only the name comes back).
# Any other exception is a bug and keeps its traceback.
USER_ERRORS = (
    "ParamsError",  # helpers.config: a params file, key or override
    "DataError",  # helpers.data: the table, a column, the template
    "ModelUnavailable",  # helpers.llm.models: a model that cannot be found or fetched
    "TrainingDiverged",  # helpers.llm.finetune: NaN loss, with the learning rate to use
    "EvaluationError",  # helpers.llm.evaluate: no run or adapter to score
    "PredictError",  # helpers.serving: new rows, a run or model that cannot be used
    "ReportError",  # helpers.analysis.records (and its NoRuns): nothing comparable
    "StoreError",  # helpers.tracking: the MLflow store or a run id
    "NotebookError",  # helpers.workflow.notebooks: a notebook's parameters cell
    "TuneError",  # helpers.workflow.tune: a study that cannot run or produced no trial
    "MemcheckError",  # helpers.llm.memcheck: a table or setting the memorization tests refuse
    "FileNotFoundError",  # a path given on the command line
)
# Set by helpers.workflow.notebooks.execute: the notebook a kernel runs (the runs' "Source"), and
# a sign that nobody watches live widgets (progress bars print text that the saved copy keeps).
ENV_NOTEBOOK = "TABLORA_NOTEBOOK"

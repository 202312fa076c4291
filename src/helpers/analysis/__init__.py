"""From MLflow runs to conclusions: records, paired statistics, the report, figures and the next
round's params. Reads runs (helpers.contract); never trains or scores a model.

    stats      exact McNemar, Holm, paired bootstrap, verdict wording
    records    MLflow runs -> RunRecord (seeds merged, one split checked)
    report     the comparison: tests, ranks, tables, REPORT.md text
    figures    the comparison's plots
    recommend  diagnoses -> next round's params files
    compare    the entry points (`tablora compare`, `tablora recommend`, compare.ipynb)
"""

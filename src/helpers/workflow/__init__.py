"""Running things: notebooks through papermill, and batches of params files (each model a nested
MLflow run, failures isolated). The top of the package below the command line.

    notebooks  execute a notebook on resolved params, attach the executed copy to its runs
    batch      `tablora batch`: plan, resume, run, summarize
"""

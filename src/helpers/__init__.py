"""tablora: can a LoRA-fine-tuned LLM beat classical ML on your table?

Importing `helpers` is cheap: MLX, MLflow and papermill are imported where they are used. The
one thing done at import is pointing MLX at an optimized BLAS on Linux (see `helpers.llm.blas`),
which has to happen before `mlx` is first imported. docs/ARCHITECTURE.md maps the package.
"""

from helpers.llm import blas as _blas

_blas.ensure_blas()

__version__ = "0.1.0"

"""The LLM arm: models (hub, local, built-in), the fast CPU kernels, LoRA training, scoring and
evaluation. The only stage that imports MLX and mlx-lm.

    models         model_id -> an mlx-lm model directory, loaded at the device's speed
    blas           an optimized BLAS for MLX's CPU backend (loaded by `import helpers`)
    kernels        llama blocks on multiply-add softmax/SwiGLU (shared by training and scoring)
    lanes          forward passes spread over one MLX CPU stream per core
    batches        which rows form a batch and in which order (every training path)
    fast_training  mlx-lm's loss and batches with less work (answer-only head, frozen prefix)
    finetune       LoRA through mlx-lm's trainer: checkpoints, early stopping, MLflow
    scoring        P(yes) by answer likelihood (prefix cache) or generation
    evaluate       zero-shot and fine-tuned on the test split, into the training run
    memcheck       has the model seen the table? memorization tests against a shuffled copy
"""

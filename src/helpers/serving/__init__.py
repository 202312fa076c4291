"""Using a round's models on new rows: the fine-tuned LLM as an MLflow pyfunc model, predictions
for a CSV from any run (LLM or baseline), the adapter fused into a standalone model.

    pyfunc   the LLM classifier as an MLflow model (logged and registered by the evaluation)
    predict  `tablora predict`: a CSV of new rows -> row_id, p_yes, prediction
    export   `tablora export`: mlx-lm's fuse of a run's adapter into its base model
"""

"""lm-eval task configs that read the local copies of the zero-shot sets ($PRUNEKIT_DATA_DIR/zeroshot)."""

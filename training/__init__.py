"""Training: LLaMA-Factory-compatible data, LoRA fine-tuning, evaluation and export for vla_node."""

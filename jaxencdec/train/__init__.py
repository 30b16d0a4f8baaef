"""Fine-tuning: run configs, data, sharded train/eval steps, and the checkpointed loop."""

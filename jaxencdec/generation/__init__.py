"""Generation: configuration, logits processors, search loops and the jitted entry point."""

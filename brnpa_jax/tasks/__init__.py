"""Tasks: what each problem adds to the shared trainer (loss and metrics)."""

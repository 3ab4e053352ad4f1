"""Command-line tools: weight conversion and golden-output generation."""

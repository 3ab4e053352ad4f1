"""State, jitted steps, shardings, optimisers, checkpoints and the loop."""

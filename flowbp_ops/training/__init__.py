"""The training loop and what it stands on: settings, batches, EMA, checkpoints, run folders, distribution."""

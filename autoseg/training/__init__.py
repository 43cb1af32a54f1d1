"""Training: splits, patch sampling, augmentation, loss, schedule, the training loop, checkpoints."""

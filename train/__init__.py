"""Train stage: batch loader over stores, the SAE module family, penalties, resampling, the training loop."""

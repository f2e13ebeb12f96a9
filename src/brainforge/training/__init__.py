"""Training: losses, the SFT LightningModule, checkpoints, and the run orchestration."""

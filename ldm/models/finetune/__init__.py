"""Fine-tuning methods: one small LightningModule per method over :class:`FineTuneModule`."""

"""Task metrics that torchmetrics does not provide (caption metrics: tasks.metrics.captioning)."""

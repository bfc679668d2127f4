"""Each task kind's metrics, one module per kind (what torchmetrics provides is used from it)."""

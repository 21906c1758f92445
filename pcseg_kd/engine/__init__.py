"""Training engines: ``toy`` trains all seeds of a small-task setting as one batched model."""

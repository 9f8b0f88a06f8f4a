"""Models in and out: architecture adapters, loading (folders, hub ids, GGUF, the embedded models), fused
projections, accelerate's dispatch, stock checkpoints and GGUF export."""

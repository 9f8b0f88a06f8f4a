"""Measuring a model: perplexity, zero-shot accuracy, latency, and the peak memory and machine of a run."""

"""Metric sinks: JSONL and TensorBoard always; a console progress bar for interactive runs."""

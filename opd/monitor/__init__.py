"""Metric sinks: JSONL and TensorBoard always; Ray custom metrics when Ray is up; a console progress bar."""

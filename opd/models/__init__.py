"""Real checkpoints built offline: GGUF files that ship as Python packages, dequantised into ordinary HF
checkpoints (``opd bootstrap --model smollm2``), and depth-pruned students made from them (``opd prune``)."""

"""Teacher scoring: a narrow protocol (per-token log-probs of given tokens, optional top-k) and its
implementations."""

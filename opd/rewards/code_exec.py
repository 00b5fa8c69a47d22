"""The ``code_exec`` verifier: runs model-written code against test cases in a sandbox (``opd.rewards.sandbox``)."""

"""The ``math_answer`` verifier: ``math-verify`` equivalence of a completion's final answer and the ground truth."""

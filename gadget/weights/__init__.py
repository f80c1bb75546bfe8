"""Weights shipped with the package (data, not code). The recipe: docs/results/shipped-weights.md."""

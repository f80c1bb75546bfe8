"""Weights shipped with the package (data, not code). See README "Shipped weights" for the recipe."""

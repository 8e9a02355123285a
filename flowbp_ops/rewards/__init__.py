"""Reward models: one differentiable interface, the built-in table, the default world's and the real ones."""

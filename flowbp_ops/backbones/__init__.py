"""Backbone implementations: one per model family, and the sigma schedule each one samples with."""

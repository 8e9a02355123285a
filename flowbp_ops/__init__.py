"""flowbp_ops: direct reward backpropagation for flow-matching text-to-image models.

The engine lives in :mod:`flowbp_ops.surrogate`; methods are presets over its four
axes in :mod:`flowbp_ops.methods`.
"""

__version__ = "0.1.0"

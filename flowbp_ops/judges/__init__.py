"""Evaluation-only judges: scores we report, never train on (no gradient flows through them).

* :mod:`flowbp_ops.judges.vlm` - a served VLM judge (UnifiedReward-style alignment and quality,
  1 to 5) reached over an OpenAI-compatible HTTP API.
* :mod:`flowbp_ops.judges.geneval` - GenEval compositional accuracy from the shipped prompt
  metadata and a user-supplied object detector.

Keeping them out of :mod:`flowbp_ops.rewards` makes it hard to optimise against the judge by
accident (reward hacking the metric we report).
"""

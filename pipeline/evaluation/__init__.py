"""Evaluation: teacher, students and baselines on held-out documents: metrics, report, plots.

The last stage: it may use `pipeline.capture` and `pipeline.train`; neither imports it.
"""

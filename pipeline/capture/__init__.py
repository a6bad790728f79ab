"""Capture: corpus (text) → packed rows → teacher pass → committed shards.

The first stage. It imports nothing from `pipeline.train` or `pipeline.evaluation`; both of those
use its public functions (loading the teacher, packing a corpus, the store's teacher/ files).
"""

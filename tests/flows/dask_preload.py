"""Preloaded by the test's `dask worker` processes (`--preload`): the imports a cache-shard task
needs happen while the worker starts, not inside the test's first task."""

import prefect.task_engine  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401

import flows.cache_teacher  # noqa: F401

"""Prefect flows: orchestration only. Each task calls one pipeline function.

Prefect is kept quiet and off the network unless the user configured it otherwise: with no
PREFECT_API_URL a flow starts Prefect's temporary local server by itself.
"""

import os

for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(_key, _value)

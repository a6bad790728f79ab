"""kdcache's benchmarks: scripts run as `python -m bench.NAME`, sharing `bench.common`."""

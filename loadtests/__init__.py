"""Load tests for a tenantfleet deployment: Locust users, scenarios and the SLO gate.

This package runs apart from the asyncio code (DESIGN.md, STYLE.md habit 12): Locust
patches its process with gevent at import, so the users and the gate run in a Locust
process of their own (`python -m loadtests.run`, started by `tenantfleet loadtest run`),
reach the fleet over HTTP only, and start fleet operations by running the `tenantfleet`
CLI as a subprocess. No module here imports `router`, `host`, `shard_migrations` or
`plugins` (tests/test_layout.py checks it). Only `users.py` and `locustfile.py` import
Locust; the rest (`slo`, `gate`, `targets`, `scenarios`, `report`, `run`) are plain
Python and can be imported anywhere.
"""

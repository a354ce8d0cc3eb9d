"""The local development and test stack: Postgres, the PBX, the simulated carrier, the bridge.

Nothing here is used in production (docker-compose.yml is the production path); `make run`,
`make start`, `make test` and `make call` drive it. `containers.py` gives the compose test
(tests/compose) a docker engine and local stand-ins for the upstream base images.
"""

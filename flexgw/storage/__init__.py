"""Rate-limit counter storage: the `IRateLimitStore` interface, the in-memory store (default), and
the Redis store for `Configuration.sharedStorage.redis`; every store passes
`tests/storage_conformance.py`."""

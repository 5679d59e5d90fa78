"""Rate-limit counter storage: the `IRateLimitStore` interface, the in-memory store (default), and
later a Redis store for `Configuration.sharedStorage`; every store passes `tests/storage_conformance.py`."""

"""Upstream side: client protocol and connection pools."""

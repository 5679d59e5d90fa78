"""Test and benchmark helpers shipped with the package: upstream servers and raw clients."""

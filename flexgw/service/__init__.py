"""Twisted services: the gateway, its listeners and the config watcher."""

"""Policies: the plug-in point, the chain runner, the expression language and the built-in kinds."""

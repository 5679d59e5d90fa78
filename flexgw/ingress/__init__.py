"""The ingress side: downstream protocol and routing."""

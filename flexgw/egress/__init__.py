"""Egress: the forward-proxy front (absolute-form requests, CONNECT), destination checks, DNS."""

"""HTTP/1.1 wire handling shared by the ingress front and the upstream client."""

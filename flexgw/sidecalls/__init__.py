"""The gateway's own HTTP calls for policies (JWKS, token introspection, OAuth tokens), made
with treq: bounded bodies and POSTs (`bounded`), and the agent that sends them through
`Configuration.spec.forwardProxy` (`proxy`). Not on the request data path."""

"""Configuration pipeline: load, validate, resolve and compile Flex resources into a GatewayPlan."""

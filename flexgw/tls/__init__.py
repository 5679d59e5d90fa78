"""TLS for flexgw: settings parsed from Flex's `tls` / `tls-outbound` / `defaultTLS` config, server
contexts per listening port (SNI among several certificates), client contexts per Service."""

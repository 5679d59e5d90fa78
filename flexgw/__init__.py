"""flexgw: a MuleSoft Flex Gateway (Local Mode) compatible API gateway on Twisted."""

__version__ = "0.1.0"

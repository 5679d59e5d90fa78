"""The HTTP/2 connections' writes batched per read and per reactor turn: see
flexgw.compat.writebatch (its home since FlexReactor batches whole turns)."""

from flexgw.compat.writebatch import begin, end, flush_soon

__all__ = ["begin", "end", "flush_soon"]

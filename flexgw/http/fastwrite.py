"""Sending at once (`send_now`): the data path's name for flexgw.compat.tcpwrite's adapter."""

from __future__ import annotations

from flexgw.compat.tcpwrite import send_now

__all__ = ["send_now"]

"""Tests for flexgw."""

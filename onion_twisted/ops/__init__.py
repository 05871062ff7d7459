"""Operator and developer tools that are no member's part: the local network."""

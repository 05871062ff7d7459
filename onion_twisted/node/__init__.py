"""The relay node: its circuit table, relay logic, Klein app and service."""

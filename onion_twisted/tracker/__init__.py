"""The tracker: node registry, catalogue, bridges, Klein app and service."""

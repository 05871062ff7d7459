"""The peer: its circuit, sharing, downloads, Klein app (the page) and service."""

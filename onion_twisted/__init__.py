"""onion_twisted: anonymous file sharing over onion circuits carried in HTTP."""

__version__ = "0.1.0"
PROTOCOL = "onion-http/1"

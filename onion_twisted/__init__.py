"""onion_twisted: anonymous file sharing over onion circuits carried in HTTP."""

__version__ = "0.2.0"
PROTOCOL_V1 = "onion-http/1"
PROTOCOL_V2 = "onion-http/2"
PROTOCOLS = (PROTOCOL_V1, PROTOCOL_V2)
PROTOCOL = PROTOCOL_V2  # the highest spoken (§10)

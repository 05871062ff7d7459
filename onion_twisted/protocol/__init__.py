"""The I/O-free core of the protocol: wire formats, crypto, cells, control and
section 8 messages, the directory, chunk bookkeeping and the seams' interfaces.
Nothing here imports ``net`` or a role."""

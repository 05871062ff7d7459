"""What every member shares: the HTTP server and client, the member service,
the directory client, configuration, keys on disk and the small helpers."""

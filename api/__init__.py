"""vector-sidecar HTTP surfaces: the CLI, the DashScope emulator and the HTTP API."""

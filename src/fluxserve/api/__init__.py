"""The HTTP API: routing, wire schemas, authentication, the error envelope."""

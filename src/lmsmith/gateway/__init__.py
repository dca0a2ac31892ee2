"""The gateway in front of `lmsmith serve`: API keys, roles, limits (kept apart from the engine)."""

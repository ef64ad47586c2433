"""Strategies of ``--space levels`` (DarwinLM compression levels); every module here is discovered by the registry."""

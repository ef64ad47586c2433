"""Strategies of ``--space layers`` (drop whole decoder blocks); every module here is discovered by the registry."""

"""Strategies of ``--space sublayers`` (attention and MLP dropped separately); every module here is discovered by
the registry."""

"""Strategies of ``--space width`` (a pruning rate per layer); every module here is discovered by the registry."""

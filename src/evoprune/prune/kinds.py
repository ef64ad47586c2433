"""The names of the within-layer importance metrics and level-database methods (pure constants, so that
configurations validate them without importing torch)."""

IMPORTANCES = ("wanda_sp", "magnitude")  # structure scores of prune.wanda_sp
DB_METHODS = ("obs", "wanda_sp")  # how prune.levels_db builds a level database

"""The names of the within-layer importance metrics and level-database methods (pure constants, so that
configurations validate them without importing torch)."""

IMPORTANCES = ("wanda_sp", "wanda_sp_all", "taylor", "magnitude")  # structure scores of prune.importance
DB_METHODS = ("obs", "wanda_sp")  # how prune.levels_db builds a level database

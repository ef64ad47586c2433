"""The names of the within-layer importance metrics, level-database methods and width reconstructions, and the
reconstruction's dampening (pure constants, so that configurations validate them without importing torch)."""

IMPORTANCES = ("wanda_sp", "wanda_sp_all", "taylor", "magnitude")  # structure scores of prune.importance
DB_METHODS = ("obs", "wanda_sp")  # how prune.levels_db builds a level database
RECONSTRUCT = ("ls", "none")  # what prune.reconstruct does to the kept columns of a width plan's output projections
# reconstruction dampening, a fraction of the mean Hessian diagonal. Uniform Wanda-sp 30% on SmolLM2-135M, held-out
# wikitext2 ppl by damp 0.01 / 0.1 / 0.3 / 0.5 / 1 / 3: 164.8 / 117.4 / 111.9 / 113.0 / 116.2 / 126.2 on 4 x 512
# calibration tokens, 1638.8 / 219.1 / 195.9 / 201.2 / 190.5 / 204.5 on 2 x 128 (less damping overfits the small set)
RECONSTRUCT_DAMP = 0.3
RECONSTRUCT_CACHE_MB = 512.0  # solved columns kept: SmolLM2 needs ~3.5 MB per MLP and ~1.3 MB per attention solve

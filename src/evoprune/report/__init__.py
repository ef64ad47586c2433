"""Reports of search runs: ``evoprune report RUN`` and ``evoprune compare RUN...``.

:func:`write_report` (:mod:`.markdown`) and :func:`compare_runs` (:mod:`.compare`) read only the run
directory files (:mod:`evoprune.runner.rundir`; no model is loaded, torch is not imported); plots
(:mod:`.plots`) are drawn with matplotlib's object API on the Agg canvas (no display, no pyplot state);
tables of every kind come from :mod:`.tables`.

``report`` writes, inside ``RUN``:

* ``fitness.png``: calibration loss of every evaluated candidate (the
  population, coloured by generation / SLEB step) and the best-so-far feasible
  loss, against evaluations (left) and token-layers (right). Candidates with
  fewer than ``k`` blocks dropped (SLEB's intermediate steps) are drawn hollow
  and do not count as best-so-far;
* ``pattern.png``: the best candidate as a 1 x N strip of blocks (dropped ones
  dark and crossed) above how often each block is dropped among the ten best
  distinct candidates; for a result with per-layer ``rates`` (width pruning) a
  bar chart of the rates instead;
* ``report.md``: a summary table, the plots, the best candidates, and any
  held-out results found as ``RUN/eval_*.json``.

``compare`` writes ``DIR/compare.png`` (calibration loss, and held-out
perplexity / mean accuracy where known, against sparsity, one line per
method) and ``DIR/compare.md`` (one table row per run). Held-out numbers come
from ``RUN/eval_*.json`` files (``evoprune eval --out`` results, or
``evoprune ppl`` JSON lines) and from ``--ppl-json FILE`` mapping a run (as
given on the command line, its path, or its directory name) to
``{"wikitext2": ppl, ...}``; a ``"dense"`` entry is drawn at sparsity 0.
"""
from .compare import compare_runs
from .markdown import write_report
from .runs import load_run, read_eval_files

__all__ = ["compare_runs", "write_report", "load_run", "read_eval_files"]

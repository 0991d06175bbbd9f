"""The report of a DNIS search and of what was pruned and retrained from it.

    python -m launch.report --run-dir runs/synthetic/search --reference runs/synthetic/train

``build_report`` (``summary``) turns the run directories, as ``runs`` reads them,
into one JSON-ready dict;
``write_report`` (``output``) draws the plots (``plots``) from that dict alone
(matplotlib's Agg canvas, no display) and writes ``report.json`` last, so a report
directory holding ``report.json`` is complete.

Inputs: a finished search (``config.yaml``, ``alpha.json``, ``blocking.json``,
``result.json``, ``metrics.jsonl``, and when present ``prune.json`` and
``fine_prune.json``), its retrain runs (``result.json``, their ``prune.json``) and
optionally a plain training run as the CR-1 reference.

Outputs:
- ``report.json``: search test metrics; α and its per-block summary; the rows-weighted
  mean kept width per (feature, block) of every structured plan; ``cr_table`` (one row
  per model: method, source, CR, embedding bytes, test AUC/logloss, the wall time of the
  stage that made it), sorted by CR; parameter counts; wall times per stage.
- ``alpha.png`` (α per block and dimension), ``dims.png`` (kept width per feature and
  block), ``cr_auc.png`` (test AUC and logloss against CR, log x), ``params.png``
  (embedding parameters unpruned and pruned; dense MLP parameters apart).

CR and bytes count embeddings only (``plans.bytes``); dense parameters are never
mixed in. A stage's wall time is ``wall_s`` from its result (or prune entry); runs written
before that field existed get the span of their own metrics events, which misses the
start-up before the first event.
"""

from pipeline.report.output import format_summary, write_report
from pipeline.report.runs import ReportError
from pipeline.report.summary import PLOTS, build_report, dense_parameters

__all__ = ["PLOTS", "ReportError", "build_report", "dense_parameters", "format_summary", "write_report"]

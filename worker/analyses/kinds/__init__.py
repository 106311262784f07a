"""One module per analysis kind, each of one shape: ``check(job)`` and ``run(job)``.

``check`` refuses, before any pass over the images, what the kind cannot do beyond its row of
:data:`classlens.core.contract.ANALYSIS_RULES` (which :mod:`worker.analyses.run` checks for every
kind); ``run`` plans its progress, computes the numbers and draws its figures (each module's
``figure``/``figures``) into an :class:`~worker.analyses.job.AnalysisOutcome`. A new kind is a new
module here, its row in the rules table and its line in the registry (:data:`worker.analyses.run.RUNNERS`).
"""

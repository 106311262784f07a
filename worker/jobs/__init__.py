"""How a worker runs each kind of job, one module per kind, behind the thin tasks of :mod:`worker.tasks`.

Every job ends in a terminal status recorded in the store, with a title and a detail a person
can act on (:mod:`worker.jobs.failures`); none is retried, since the same input would fail the
same way. Work is idempotent: a redelivered job whose result exists is just marked succeeded.
"""

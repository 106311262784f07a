"""Every kind of key in the store, by its prefix: the store's whole layout in one table.

Each kind of key is its prefix followed by what names it; no prefix starts another, so a
sweep of one kind (:meth:`~classlens.core.store.Store.keys`) never returns another's keys.
docs/service-design.md says what each holds and for how long:

=================  ==============================  ==========================================
prefix             followed by                     holds
=================  ==============================  ==========================================
``job:``           the job id                      the job record (:mod:`classlens.core.jobs`)
``image:``         the image's sha256              an uploaded image
``manifest:``      the manifest's sha256           an audit's or analysis' list of images
``figure:``        the figure's sha256             an analysis figure (PNG or HTML)
``result:``        the content key                 the result JSON (the cache)
``inflight:``      the content key                 the id of the job computing it
``made-for:``      the content key                 the API key whose submission queued it
``claim:``         the job id                      the worker running it (:mod:`classlens.core.leases`)
``alive:``         the worker id                   that worker's heartbeat
``heartbeat:``     ``worker``                      the freshest beat of any worker (``/readyz``)
``batch:``         model and parameters' digest    jobs that can share a pass (:mod:`classlens.core.batching`)
``stats:``         the counter's name              job and emergence counters (:mod:`classlens.core.stats`)
``signals:``       model and slot                  one recent explanation's signals (:mod:`classlens.core.monitoring`)
``reference:``     the model (name@version)        its reference audit's signals (:mod:`classlens.core.monitoring`)
``owned:``         the API key id                  that key's unfinished jobs (its cap)
``quota-lock:``    the API key id                  the lock that checks that cap
``notice:``        a channel (``job:<id>``...)     not a key: the Redis channel notices go out on
=================  ==============================  ==========================================
"""

from __future__ import annotations

JOB = "job:"
IMAGE = "image:"
MANIFEST = "manifest:"
FIGURE = "figure:"
RESULT = "result:"
INFLIGHT = "inflight:"
MADE_FOR = "made-for:"
CLAIM = "claim:"
ALIVE = "alive:"
HEARTBEAT = "heartbeat:"
BATCH = "batch:"
STATS = "stats:"
SIGNALS = "signals:"
REFERENCE = "reference:"
OWNED = "owned:"
QUOTA_LOCK = "quota-lock:"
NOTICE = "notice:"

# Every prefix above, in the table's order.
PREFIXES = (
    JOB,
    IMAGE,
    MANIFEST,
    FIGURE,
    RESULT,
    INFLIGHT,
    MADE_FOR,
    CLAIM,
    ALIVE,
    HEARTBEAT,
    BATCH,
    STATS,
    SIGNALS,
    REFERENCE,
    OWNED,
    QUOTA_LOCK,
    NOTICE,
)

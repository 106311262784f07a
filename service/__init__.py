"""The HTTP API of ClassLens (Flask). It never imports torch: it enqueues work by task name.

Build it with :func:`service.app.create_app`; the contract is ``openapi.yaml`` at the
repository root (see ``docs/service-design.md``).
"""

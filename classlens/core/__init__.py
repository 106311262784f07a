"""The torch-free shared core: settings, the contract, the store, jobs, the queue, request rules, images.

Everything here is imported by both the API (`service`) and the workers (`worker`), so nothing
here imports torch, timm, Celery's tasks, Flask or either side.
"""

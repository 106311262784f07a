"""The HTTP API of ClassLens (Flask). It never imports torch: it enqueues work by task name.

The API itself is built in the service issue (#4); until then this package is empty
and `make run` lists and verifies the model store instead of serving.
"""

"""The API's blueprints: explanations (jobs, maps), models (the catalog), operations (health, metrics, docs)."""

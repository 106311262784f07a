"""The API's blueprints: explanations (jobs, maps), audits and analyses (batch jobs, downloads, figures),
models (the catalog), operations (health, metrics, docs)."""

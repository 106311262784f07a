"""ClassLens: explain image classifiers in their class embedding space."""

__version__ = "0.1.0"

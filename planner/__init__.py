"""Self-configuring planner: dataset layer, toy data, fingerprint, plan rules, preprocessing, bundle generation."""

__version__ = "0.1.0"

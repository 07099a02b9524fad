"""moescope's version (pyproject.toml says the same): recorded in manifests and reports."""

__version__ = "0.1.0"

"""The one version source: read by ``tokenopt.__version__`` and by the build (pyproject's dynamic version)."""

__version__ = "0.2.0"

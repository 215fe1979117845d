"""The version of shmctx: written here and nowhere else. The package metadata
(pyproject.toml reads it at build time), ``shmctx.__version__`` and
``ctx-inspect --version`` all come from it."""

__version__ = "0.1.0"

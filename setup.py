"""Only the optional C hot path; everything else is in pyproject.toml.

``optional=True``: without a C compiler the build goes on and shmctx runs its hot path
in Python (the same semantics, about 3 µs a get/return pair instead of 0.25 µs:
docs/performance.md).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # depends: a changed layout header (generated from _layout.py) rebuilds it.
        Extension("shmctx._speedups", ["src/shmctx/_speedups.c"], optional=True,
                  depends=["src/shmctx/_layout.h"],
                  extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                      "-Wno-missing-field-initializers"]),
    ],
)

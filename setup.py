"""Build the optional native core; everything else is in pyproject.toml.

``optional=True``: where there is no C compiler or the build fails, the
install still succeeds and shmheap runs on its pure-Python core.
"""

from setuptools import Extension, setup

NATIVE = Extension("shmheap._native", ["shmheap/_native.c"], depends=["shmheap/_layout.h"],
                   extra_compile_args=["-O2", "-std=gnu11"], optional=True)

setup(ext_modules=[NATIVE])

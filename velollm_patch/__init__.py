"""velollm-patch: build a patched llama.cpp server for this machine, tune it, serve it, measure it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("velollm-patch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

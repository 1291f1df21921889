"""The installed package version, with a fallback for a source checkout."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("analytic-sampler")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

"""slimgrade's grader: runs student notebooks, judges them with trusted code, explains."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slimgrade")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0"

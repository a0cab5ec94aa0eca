"""Wire formats: one module per header, each with parse (validating) and emit."""
import sys

# dataclass(slots=True) arrived in Python 3.10; the stack also runs under
# PyPy 3.9, where the headers are plain dataclasses.
SLOTS = {"slots": True} if sys.version_info >= (3, 10) else {}

"""The fuzz and flood tests share tests/faults' private-network harness."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "faults"))

"""Packet I/O backends behind one small interface (see base.py)."""

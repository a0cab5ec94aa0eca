"""mtcpshim: run unmodified Linux programs over a user-level TCP stack."""

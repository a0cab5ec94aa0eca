"""Wire formats: one module per header, each with parse (validating) and emit."""

"""Package data: the shipped open-set scorer (see docs/openset-model.md)."""

"""Enforcers: the only code with side effects on the host."""

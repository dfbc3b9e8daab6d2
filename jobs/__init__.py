"""Thin job entry points: parse flags into a config, then call gatrep."""

"""Command-line tools: each parses its flags and calls importable functions."""

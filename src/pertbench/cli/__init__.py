"""Command-line interface (``pertbench --help``)."""

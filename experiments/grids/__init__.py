"""Grids of training runs: the grid table, the runner, the report, and the
rendering of the docs' tables from result records."""

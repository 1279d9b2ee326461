"""Figures (matplotlib) and the Markdown/HTML report."""

"""Run reports: results tables (and, later, figures and HTML)."""

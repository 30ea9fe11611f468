"""Reporting: aggregate per-run metrics over seeds, write paper tables (CSV + LaTeX) and figures."""

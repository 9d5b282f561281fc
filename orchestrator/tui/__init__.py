"""The terminal renderers: tables, reports and the live progress view."""

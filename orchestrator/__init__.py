"""orchestrator: gradual, table-by-table PostgreSQL schema moves."""

__version__ = "0.1.0"

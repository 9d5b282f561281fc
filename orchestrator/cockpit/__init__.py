"""The operator's cockpit: an interactive terminal (Textual) over the core."""

"""Read models of a plan: its status, metrics, and where it is going."""

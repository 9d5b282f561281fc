"""The stages of a table's move: one module per stage, each an object of `base.Stage`, ordered
per strategy in `registry`."""

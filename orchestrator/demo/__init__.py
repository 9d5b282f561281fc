"""The Cogito demo: sample schema, simulated application, the scripted move."""

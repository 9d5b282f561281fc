"""A move to another server: the link to it, our replication objects on both servers, and the
DDL of the target table and of the compatibility relation (docs/cross-server.md)."""

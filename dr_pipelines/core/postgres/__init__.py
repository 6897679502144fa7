"""PostgreSQL: the client side (connections, tools), local clusters, WAL names and LSNs."""

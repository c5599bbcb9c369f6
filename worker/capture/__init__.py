"""Change capture: PostgreSQL logical replication and Debezium streams as sources (docs/capture.md)."""

"""An endpoint: the HTTP API (Bottle on granian) over its own SQLite file, one of two peers."""

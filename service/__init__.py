"""tiercache: a shared HTTP cache over Redis, process memory and SQLite."""

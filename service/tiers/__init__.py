"""The cache tiers: Redis (shared), memory (this process), SQLite (this host, durable)."""

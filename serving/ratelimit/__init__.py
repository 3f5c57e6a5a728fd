"""Per-tenant and per-key rate limits: token buckets in memory (one node) or in Redis (replicas)."""

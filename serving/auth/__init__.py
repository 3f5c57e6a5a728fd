"""Identity and access: API keys and their stores, OIDC and workload tokens, scopes and the guard."""

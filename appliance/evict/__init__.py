"""Replica cache eviction: a usage-scored policy that removes only studies retrievable
elsewhere (the central PACS or other mesh holders) and withdraws them from the catalog."""

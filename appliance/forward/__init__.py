"""Store-and-forward: rules route stored instances/studies to destinations via a durable,
retrying queue kept in the store's LMDB environment."""

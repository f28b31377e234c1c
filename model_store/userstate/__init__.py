"""User state in Redis: the key schema, connections, and the batch publisher."""

"""The default world: a small but real text-to-image task that trains on two CPU cores."""

"""Model artifacts and how they become torch modules in a worker process."""

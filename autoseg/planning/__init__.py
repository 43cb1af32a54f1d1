"""What to do about the data: target spacing, patch, topology, batch size, normalization."""

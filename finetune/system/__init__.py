"""Machine and process plumbing every stage shares: atomic writes, BLAS, memory, hashing, locks, child processes."""

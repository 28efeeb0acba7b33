"""What the daemon keeps on disk across restarts: config generations and learned sizes."""

"""The lazy filesystem: mount daemon, mounts, `cafs run`, the weight loader, the CLI."""

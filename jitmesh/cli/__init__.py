"""jitctl, the operator CLI: `main.main` is the entry point, `output` formats results."""

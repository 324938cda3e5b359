"""Command-line plumbing shared by the tools and launchers (the entry points stay thin)."""

"""`python -m saecache` is the same as the `saecache` command."""

from saecache.cli import main

main()

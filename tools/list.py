"""Thin script over `zoo list` (same arguments), for those who run tools/*.py instead of the console script."""
import sys

from zoo.cli import main

if __name__ == '__main__':
    sys.exit(main(['list', *sys.argv[1:]]))

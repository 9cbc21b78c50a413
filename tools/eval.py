"""Thin script over `zoo eval` (same arguments), for those who run tools/*.py instead of the console script."""
import sys

from zoo.cli import main

if __name__ == '__main__':
    sys.exit(main(['eval', *sys.argv[1:]]))

"""Thin script over `zoo train` (same arguments), for those who run tools/*.py instead of the console script."""
import sys

from zoo.cli import main

if __name__ == '__main__':
    sys.exit(main(['train', *sys.argv[1:]]))

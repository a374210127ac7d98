from syncd.cli import entry

entry()

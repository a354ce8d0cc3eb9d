"""`make bench`: the bridge next to plain Asterisk (see bench/__main__.py)."""

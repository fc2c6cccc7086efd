"""Wire out: the terminal stage, one client per upstream protocol."""

"""The `mdsweep` commands, one module each (`main` builds the parser). May import every layer below."""

"""Command line: wires settings to the parts. Nothing imports this package."""

"""The command line (Typer); see app.py."""

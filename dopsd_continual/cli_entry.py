"""`python -m dopsd_continual.cli_entry ...` runs the CLI (what the `dopsd` script runs)."""

from .cli import app

if __name__ == "__main__":
    app()

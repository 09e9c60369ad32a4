"""What the `dopsd` script runs (and `python -m dopsd_continual.cli_entry ...`): a `dopsd sample` that a running
daemon answers is served by client.py's light process, everything else by the full command line."""

import sys


def main() -> None:
    if sys.argv[1:2] == ["sample"]:
        from .client import sample

        if sample(sys.argv[2:]):
            return
    from .cli import run

    run()


if __name__ == "__main__":
    main()

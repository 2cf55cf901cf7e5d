"""`python -m mirasc`: the command line (`mirasc.cli`), as the `mirasc` script runs it."""

from mirasc.cli import app

if __name__ == "__main__":
    app()

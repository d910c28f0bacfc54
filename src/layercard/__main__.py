"""``python -m layercard``: the command line, also as a module for launchers (``accelerate launch -m``)."""

from layercard.cli import app

# Guarded: worker processes started by spawning import this module again under another name.
if __name__ == "__main__":
    app(prog_name="layercard")

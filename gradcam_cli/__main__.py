"""``python -m gradcam_cli``: the same command as ``gradcam``."""

import sys

from gradcam_cli.cli import command_line

if __name__ == "__main__":
    sys.exit(command_line(prog="python -m gradcam_cli"))

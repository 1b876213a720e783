"""Grad-CAM from the command line: where does a trained image classifier look?

The specification's entry: ``python main.py --help`` lists the flags. The code lives in the
package ``gradcam_cli``; installed with ``pip install .``, the same command is ``gradcam``.
"""

import sys

from gradcam_cli.cli import command_line

if __name__ == "__main__":
    sys.exit(command_line(prog="main.py"))

"""gradcam_cli: Grad-CAM heatmaps for a trained PyTorch image classifier, from the command line.

``gradcam`` (or ``python main.py`` in a checkout) explains a folder of images; the engine
(``gradcam_cli.gradcam``: ``explain``, ``grad_cam``) works on its own from Python too.
"""

__version__ = "2.0.0"

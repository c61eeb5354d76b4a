"""LiverTumorSeg engine: liver and liver-tumour segmentation of contrast-enhanced CT.

Pure Python on numpy, SimpleITK and ONNX Runtime; imports neither Qt nor torch. One module per
pipeline stage (``image_io``, ``preprocess``, ``cascade``, ``postprocess``, ``volumetry``), orchestrated
by ``pipeline``; ``mrml_nodes`` turns results into Slicer nodes; ``cli`` is the ``livertumorseg`` command.
"""

__version__ = "0.1.0"

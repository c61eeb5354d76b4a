"""The README's resection-planning figure: `livertumorseg plan` on the demo's segmentation, its frontal view saved.

    .venv/bin/livertumorseg demo -o demo-output
    .venv/bin/python scripts/make_resection_figure.py demo-output/segmentation.nii.gz docs/resection_plan.png

The plane is sagittal, 11 mm to the patient's right of the demo liver's centroid, resecting the right side.
"""

import base64
import re
import sys
import tempfile
from pathlib import Path

from LiverTumorSegLib.cli import main

PLANE = "-45,-10,-262.6,-1,0,0"  # point (LPS mm) and normal towards the resected side

if __name__ == "__main__":
    segmentation, figure = Path(sys.argv[1]), Path(sys.argv[2])
    out = Path(tempfile.mkdtemp(prefix="plan-")) / "plan"
    if main(["plan", str(segmentation), f"--plane={PLANE}", "-o", str(out)]) != 0:
        sys.exit(1)
    html = (out / "plan.html").read_text(encoding="utf-8")
    frontal = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)[1]
    figure.write_bytes(base64.b64decode(frontal))
    print(f"wrote {figure}")

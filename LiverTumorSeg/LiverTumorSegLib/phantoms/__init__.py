"""Synthetic contrast-enhanced abdominal CT phantoms with liver and liver-tumour labels.

The project trains and tests on these until real data is available, and models are judged on real CT, so
the phantoms aim at the variety of a real cohort rather than at an easy task:

* **Anatomy** (patient specific, seeded): body outline with skin, subcutaneous and visceral fat, abdominal
  wall and paraspinal muscles, patient table; lung bases, heart and diaphragm domes; a liver built from
  warped lobes (large right lobe, left lobe across the midline, caudate lobe, hilum, fissure) moulded by the
  abdominal wall and the right hemidiaphragm, with branching portal and hepatic veins; spleen, kidneys
  (cortex, medulla, sinus), stomach with an air-fluid level, gallbladder, pancreas, duodenum, colon, small
  bowel, mesenteric and pulmonary vessels, aorta and IVC with their branches, vertebrae, ribs with costal
  cartilage, sternum. Optional steatosis, cirrhotic surface, ascites, vascular calcification.
* **Tumours**: 0-8 per case, 3-80 mm, small ones frequent; hypodense, hyperdense, rim-enhancing,
  necrotic-centred, cystic and calcified; round, lobulated or irregular; sharp or blurred margins; some
  touching the capsule or a vessel. Each is listed in :attr:`Phantom.tumours`.
* **HU levels** by contrast phase (portal-venous about 75 %, late-arterial, unenhanced) with a contrast
  scale of +/-15 %: portal-venous liver about 90-130 HU, portal/hepatic veins about 150-200 HU, lesions
  mostly 20-60 HU below the liver (see :func:`.tissues.tissue_levels` and :func:`.lesions.tumour_levels`).
* **Acquisition**: 0.6-0.9 mm pixels (512x512) and 1-5 mm slices, field of view fitted to the patient
  (sometimes cutting the body edge, sometimes with a circular reconstruction mask), off-centre patients,
  partial-volume edges, a reconstruction-kernel blur and correlated scanner noise with a CT-like
  (band-pass) noise power spectrum.

Label maps follow LiTS: 0 background, 1 liver (with the vessels inside it), 2 tumour (inside the liver).
Arrays are in the engine's canonical orientation: (z, y, x) running inferior->superior,
anterior->posterior and patient right->left, identity direction (LPS).

Generation is deterministic per seed. The anatomy, tumours and acquisition parameters are drawn from
separate random streams, so ``size="small"`` renders the same patient as ``size="full"`` on a coarse grid
(for fast tests). Shapes are evaluated on coarse grids inside their bounding boxes and interpolated
linearly to the image grid, which keeps a full-size case within a few seconds on two CPU cores.

Modules, one concern each: ``fields`` (shape primitives, random fields), ``grid`` (image grid, sampling,
painting), ``body`` and ``anatomy`` (the patient), ``tissues`` (classes and HU levels), ``torso`` and
``abdomen`` (painting the parts), ``vessels``, ``textures``, ``lesions``, ``scanner`` (acquisition and image
formation), ``case`` (one case put together) and ``writing`` (datasets on disk).
"""

from .case import PHANTOM_VERSION, Case, Phantom, case_seed, generate_phantom
from .lesions import MAX_DIAMETER_MM, MIN_DIAMETER_MM, TUMOUR_SHAPES, TUMOUR_TYPES
from .scanner import SIZES
from .tissues import PHASES, TISSUES, Tissue, tissue_hu_table
from .writing import write_phantom_dataset

__all__ = [
    "TISSUES",
    "PHASES",
    "SIZES",
    "Phantom",
    "generate_phantom",
    "write_phantom_dataset",
    "tissue_hu_table",
    "case_seed",
    "Case",
    "Tissue",
    "TUMOUR_TYPES",
    "TUMOUR_SHAPES",
    "MIN_DIAMETER_MM",
    "MAX_DIAMETER_MM",
    "PHANTOM_VERSION",
]

"""Report: one self-contained HTML page for the surgical planner (overlays, volumetry, run details).

Choices:

* **Self-contained**: the two overlay PNGs are embedded as base64 ``data:`` URIs, so the report is a
  single file that can be mailed, archived in the patient folder or moved without breaking; it is
  written atomically (nothing is left behind on error, an existing report is replaced only with
  ``overwrite``).
* **Radiological display**, whatever the orientation of the input grid: the arrays are viewed (axes
  permuted and flipped, no copy and no resampling) in the canonical LPS orientation of
  :mod:`.image_io`, chosen from the geometry's direction by SimpleITK's nearest-axis orientation code.
  Axial: patient right on the image's left, anterior on top. Coronal: patient right on the left,
  superior on top. The pixel aspect ratio comes from the spacing.
* CT window W400 / L50 (−150…250 HU); liver outline green, tumour red (outline plus a translucent fill so
  that small lesions stay visible). The axial and coronal slices go through the largest lesion's
  centroid, or the liver's centre of mass when there is no lesion, or the volume centre.
* Centroids are shown in RAS millimetres, the coordinates 3D Slicer displays (R = −x, A = −y, S = z of
  the LPS values in the volumetry).
* matplotlib through its object API with the Agg canvas only (``matplotlib.figure.Figure``), never
  ``pyplot``: no global backend state is touched, which matters inside 3D Slicer's Qt application.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage

from .image_io import Geometry, atomic_path
from .masks import bounding_box

WINDOW_HU, LEVEL_HU = 400.0, 50.0
LIVER_COLOUR = "#00c800"
TUMOUR_COLOUR = "#ff2020"
TUMOUR_FILL_ALPHA = 0.35
FIGURE_WIDTH_IN, DPI = 5.5, 110
RESEARCH_NOTE = (
    "Research use only. This segmentation and every measurement in this report were produced automatically "
    "and are not a medical device output. They must be reviewed, and corrected where needed, by a qualified "
    "clinician before they inform any clinical decision."
)


def write_report(
    out_html: str | os.PathLike,
    image_hu: np.ndarray,
    labels: np.ndarray,
    geometry: Geometry,
    volumetry: dict,
    *,
    title: str,
    details: dict,
    overwrite: bool = False,
) -> list[Path]:
    """Write the HTML report (PNG overlays embedded) and return the files written (the HTML page)."""
    out_html = Path(out_html)
    image_hu, labels = np.asarray(image_hu), np.asarray(labels)
    if image_hu.ndim != 3 or image_hu.shape != labels.shape:
        raise ValueError(f"image {image_hu.shape} and labels {labels.shape} must be 3D arrays of the same shape")

    axes = canonical_axes(geometry)
    ct, lab = canonical_view(image_hu, axes), canonical_view(labels, axes)
    spacing = canonical_spacing(geometry, axes)  # (z, y, x) of the canonical view
    centre, centre_text = _display_centre(labels, volumetry, axes)
    z, y = (int(np.clip(round(c), 0, n - 1)) for c, n in zip(centre[:2], ct.shape[:2]))
    shown = np.array([z, y, centre[2]], dtype=float)  # the slices actually displayed
    slice_mm = geometry.index_to_physical(_to_input_index(shown, axes, labels.shape))

    axial = _overlay_png(ct[z], lab[z], row_mm=spacing[1], col_mm=spacing[2], marks=("A", "P", "R", "L"))
    # Canonical z runs inferior → superior: flip rows so that superior is on top.
    coronal = _overlay_png(ct[::-1, y], lab[::-1, y], row_mm=spacing[0], col_mm=spacing[2],
                           marks=("S", "I", "R", "L"))
    figures = [
        (axial, f"Axial view at S = {slice_mm[2]:.1f} mm through {centre_text}."),
        (coronal, f"Coronal view at A = {-slice_mm[1]:.1f} mm through {centre_text}."),
    ]
    page = _html_page(title, volumetry, figures, details, geometry, image_hu.shape)
    with atomic_path(out_html, overwrite=overwrite) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return [out_html]


# ------------------------------------------------------------------------------------------- orientation


def canonical_axes(geometry: Geometry) -> tuple[tuple[int, bool], ...]:
    """For the canonical array axes (z → S, y → P, x → L): (source array axis, flipped) each.

    SimpleITK's orientation code names, for each voxel axis i, j, k, the patient direction it points to
    (nearest axis for oblique images), as :func:`.image_io.to_canonical` uses it.
    """
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(geometry.direction)
    result = []
    for target, pair in (("S", "SI"), ("P", "PA"), ("L", "LR")):
        voxel_axis = next(i for i, letter in enumerate(code) if letter in pair)
        result.append((2 - voxel_axis, code[voxel_axis] != target))  # array axes are (z, y, x) = (k, j, i)
    return tuple(result)


def canonical_view(array: np.ndarray, axes: tuple[tuple[int, bool], ...]) -> np.ndarray:
    """The array seen in the canonical orientation: a strided view (permute + flip), not a copy.

    Hand-written rather than SimpleITK's DICOMOrient because the report needs two slices of the volume,
    not a reoriented copy of a whole 512×512×600 CT and its label map.
    """
    view = np.transpose(array, [source for source, _ in axes])
    return view[tuple(slice(None, None, -1) if flipped else slice(None) for _, flipped in axes)]


def canonical_spacing(geometry: Geometry, axes: tuple[tuple[int, bool], ...]) -> tuple[float, float, float]:
    return tuple(float(geometry.spacing[2 - source]) for source, _ in axes)


def _to_input_index(canonical_zyx: np.ndarray, axes, shape) -> np.ndarray:
    index = np.empty(3)
    for c, (source, flipped) in zip(canonical_zyx, axes):
        index[source] = (shape[source] - 1 - c) if flipped else c
    return index


def _to_canonical_index(input_zyx, axes, shape) -> list[float]:
    return [(shape[source] - 1 - input_zyx[source]) if flipped else input_zyx[source] for source, flipped in axes]


def _display_centre(labels: np.ndarray, volumetry: dict, axes) -> tuple[list[float], str]:
    lesions = volumetry.get("lesions") or []
    if lesions:
        return _to_canonical_index(lesions[0]["centroid_voxel_zyx"], axes, labels.shape), "lesion 1 (the largest)"
    box = bounding_box(labels > 0)
    if box is not None:
        com = np.array(ndimage.center_of_mass(labels[box] > 0)) + [s.start for s in box]
        return _to_canonical_index(com, axes, labels.shape), "the liver's centre"
    return _to_canonical_index([(n - 1) / 2 for n in labels.shape], axes, labels.shape), "the volume's centre"


# ---------------------------------------------------------------------------------------------- figures


def _overlay_png(ct: np.ndarray, labels: np.ndarray, *, row_mm: float, col_mm: float, marks) -> bytes:
    """One 2D overlay (rows down, columns right as displayed) as PNG bytes."""
    rows, cols = ct.shape
    height_mm, width_mm = rows * row_mm, cols * col_mm
    height_in = float(np.clip(FIGURE_WIDTH_IN * height_mm / width_mm, 1.5, 9.0))
    figure = Figure(figsize=(FIGURE_WIDTH_IN, height_in), dpi=DPI, facecolor="black")
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set_facecolor("black")
    aspect = row_mm / col_mm
    ax.imshow(ct, cmap="gray", vmin=LEVEL_HU - WINDOW_HU / 2, vmax=LEVEL_HU + WINDOW_HU / 2,
              aspect=aspect, interpolation="antialiased")
    liver, tumour = labels > 0, labels == 2
    if tumour.any():
        fill = np.zeros((rows, cols, 4), np.float32)
        fill[tumour] = (1.0, 0.125, 0.125, TUMOUR_FILL_ALPHA)
        ax.imshow(fill, aspect=aspect, interpolation="nearest")
    for mask, colour in ((liver, LIVER_COLOUR), (tumour, TUMOUR_COLOUR)):
        if mask.any() and not mask.all():  # a constant mask has no outline (and matplotlib would warn)
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.2)
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    return marked_png(figure, ax, marks)


def marked_png(figure, ax, marks) -> bytes:
    """The figure as PNG bytes, with the patient-direction letters (top, bottom, left, right) at the edges."""
    top, bottom, left, right = marks
    style = dict(color="yellow", fontsize=11, fontweight="bold", transform=ax.transAxes)
    ax.text(0.5, 0.99, top, ha="center", va="top", **style)
    ax.text(0.5, 0.01, bottom, ha="center", va="bottom", **style)
    ax.text(0.01, 0.5, left, ha="left", va="center", **style)
    ax.text(0.99, 0.5, right, ha="right", va="center", **style)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="black")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------- HTML


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d2125; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #d0d4d8; padding-bottom: 0.2em; }
.note { background: #fff4e5; border-left: 5px solid #e08a00; padding: 0.7em 1em; margin: 1em 0; }
.meta { color: #5a6470; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.95em; }
th, td { border: 1px solid #d0d4d8; padding: 0.35em 0.7em; text-align: left; vertical-align: top; }
th { background: #eef1f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.summary td:first-child { font-weight: 600; }
.figures { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure { margin: 0; flex: 1 1 420px; }
figure img { width: 100%; height: auto; background: #000; }
figcaption { font-size: 0.9em; color: #3a424a; margin-top: 0.3em; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; vertical-align: -0.1em; margin: 0 0.25em 0 0.6em; }
"""


def html_head(title: str, css: str) -> list[str]:
    """The opening lines of a self-contained page, up to and including its ``<h1>`` title."""
    esc = html.escape
    return ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
            f"<title>{esc(title)}</title>", f"<style>{css}</style>", "</head>", "<body>", f"<h1>{esc(title)}</h1>"]


def _html_page(title, volumetry, figures, details, geometry, shape) -> str:
    esc = html.escape
    lesions = volumetry.get("lesions") or []
    summary = [
        ("Liver volume (including tumour)", f"{volumetry['liver_volume_ml']:.2f} mL"),
        ("Tumour volume (all lesions)", f"{volumetry['tumour_volume_ml']:.2f} mL"),
        ("Tumour burden (tumour / liver volume)", f"{volumetry['tumour_burden_percent']:.2f} %"),
        ("Number of lesions", f"{volumetry['lesion_count']}"),
    ]
    parts = [
        *html_head(title, CSS),
        f'<p class="meta">Generated {esc(datetime.datetime.now().astimezone().isoformat(timespec="seconds"))}. '
        f"Image grid {shape[2]} × {shape[1]} × {shape[0]} voxels, spacing "
        f"{' × '.join(f'{s:.3g}' for s in geometry.spacing)} mm, orientation "
        f"{esc(sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(geometry.direction))}.</p>",
        f'<p class="note"><strong>{esc(RESEARCH_NOTE)}</strong></p>',
        *(f'<p class="note"><strong>Check:</strong> {esc(warning)}</p>' for warning in (details or {}).get("warnings", [])),
        "<h2>Volumetry</h2>",
        '<table class="summary">',
        *(f'<tr><td>{esc(name)}</td><td class="num">{esc(value)}</td></tr>' for name, value in summary),
        "</table>",
    ]
    if lesions:
        header = ["Lesion", "Volume (mL)", "Equivalent diameter (mm)", "Longest axial diameter (mm)",
                  "Mean ± SD (HU)", "Slices", "Centroid R, A, S (mm)", "Classifier probability"]
        parts += ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
        for lesion in lesions:
            x, y, z = lesion["centroid_lps_mm"]
            first, last = lesion["slice_range"]
            probability = lesion.get("probability")
            cells = [
                f"{lesion['id']}", f"{lesion['volume_ml']:.2f}", f"{lesion['equivalent_diameter_mm']:.1f}",
                f"{lesion['longest_axial_diameter_mm']:.1f}", f"{lesion['mean_hu']:.0f} ± {lesion['std_hu']:.0f}",
                f"{first + 1}–{last + 1}", f"{-x:.1f}, {-y:.1f}, {z:.1f}",
                "—" if probability is None else f"{probability:.2f}",
            ]
            parts.append("<tr>" + "".join(f'<td class="num">{esc(c)}</td>' for c in cells) + "</tr>")
        parts += ["</table>",
                  '<p class="meta">Slices are numbered from 1 along the image\'s slice axis. Longest axial '
                  "diameter: largest in-plane caliper diameter over the axial slices.</p>"]
    else:
        parts.append("<p>No liver tumour was detected.</p>")

    legend = (f'<span class="swatch" style="background:{LIVER_COLOUR}"></span>liver outline'
              f'<span class="swatch" style="background:{TUMOUR_COLOUR}"></span>tumour')
    parts += ["<h2>Images</h2>",
              f'<p class="meta">CT window W{WINDOW_HU:.0f} / L{LEVEL_HU:.0f}. Radiological convention: patient '
              f"right on the image's left. {legend}</p>",
              '<div class="figures">']
    for png, caption in figures:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{esc(caption)}</figcaption></figure>")
    parts.append("</div>")

    parts += ["<h2>Processing details</h2>", "<table>"]
    for key, value in (details or {}).items():
        parts.append(f"<tr><th>{esc(str(key))}</th><td>{_render_value(value)}</td></tr>")
    parts += ["</table>", "</body>", "</html>", ""]
    return "\n".join(parts)


def _render_value(value: Any) -> str:
    """A details value as HTML: dicts as nested tables, lists joined, numbers compact."""
    if isinstance(value, dict):
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_render_value(v)}</td></tr>" for k, v in value.items())
        return f"<table>{rows}</table>"
    if isinstance(value, (list, tuple)):
        return ", ".join(_render_value(v) for v in value)
    if isinstance(value, (float, np.floating)):
        return html.escape(f"{float(value):.4g}")
    return html.escape(str(value))

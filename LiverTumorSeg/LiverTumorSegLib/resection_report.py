"""Resection plan outputs: ``plan.json``, ``plan.csv`` and a one-page printable ``plan.html``, in one folder.

* The folder is written atomically (:func:`.image_io.atomic_path`): all three files appear together or
  none. ``--overwrite`` replaces only a previous plan folder, recognised by holding nothing but the plan
  files and a ``plan.json`` whose ``producer`` is this engine (:func:`check_plan_folder`).
* ``plan.json`` holds the :func:`.resection.plan_resection` result as is, plus producer, version and inputs.
* ``plan.csv``: a ``plan`` summary row, then one ``tumour`` row per tumour; empty cells where a column
  does not apply (:data:`CSV_COLUMNS`). Numbers with full precision.
* ``plan.html``: volumes, FLR with threshold and verdict, the margins table and two figures embedded as
  PNG ``data:`` URIs: an axial slice of the label map (through the largest tumour, else the liver's
  centre) and a projection seen from the front in which each pixel's colour mixes remnant and resected
  liver along the ray, its brightness the liver thickness, tumours in red. Both in the radiological
  display of :mod:`.report` (patient right on the image's left), with the same matplotlib Agg figures.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from . import __version__
from .image_io import Geometry, atomic_path
from .output_folder import PRODUCER, check_output_folder
from .report import (CSS, DPI, FIGURE_WIDTH_IN, LIVER_COLOUR, RESEARCH_NOTE, TUMOUR_COLOUR, canonical_axes,
                     canonical_spacing, canonical_view, html_head, marked_png)
from .resection import TUMOUR, ResectionPlan, number_tumours

PLAN_JSON, PLAN_CSV, PLAN_HTML = "plan.json", "plan.csv", "plan.html"
PLAN_FILES = frozenset({PLAN_JSON, PLAN_CSV, PLAN_HTML})
RESECTED_COLOUR = "#3c78d8"
CSV_COLUMNS = (
    "structure", "id", "volume_ml", "resected_volume_ml", "remnant_volume_ml", "functional_volume_ml",
    "functional_remnant_volume_ml", "flr_percent", "liver_state", "threshold_percent", "verdict", "resected",
    "margin_mm", "margin_flag", "centroid_x_lps_mm", "centroid_y_lps_mm", "centroid_z_lps_mm",
)
PLAN_CSS = CSS + """
.verdict-pass { color: #11772d; font-weight: 700; }
.verdict-fail { color: #b3141b; font-weight: 700; }
@media print { body { margin: 0; max-width: none; font-size: 10pt; } figure { flex: 1 1 45%; } h2 { break-after: avoid; } }
"""


def check_plan_folder(output: str | os.PathLike, inputs=(), *, overwrite: bool = False) -> Path:
    """The output-folder rules of :func:`.output_folder.check_output_folder` for a plan folder: ``--overwrite``
    replaces only a previous plan (the plan files and a ``plan.json`` written by this engine)."""
    return check_output_folder(output, inputs, overwrite=overwrite, files=PLAN_FILES, marker=PLAN_JSON)


def write_plan(out: str | os.PathLike, plan: ResectionPlan, labels: np.ndarray, geometry: Geometry, *,
               title: str, inputs: dict, overwrite: bool = False) -> Path:
    """Write plan.json, plan.csv and plan.html into the folder ``out`` atomically; return the folder.

    ``inputs`` (e.g. the label map's and mask's file names) is recorded in plan.json and the page.
    """
    document = {"producer": PRODUCER, "version": __version__, "inputs": inputs, **plan.result}
    page = _html_page(title, plan.result, inputs, _figures(np.asarray(labels), plan.resected_liver, geometry))
    with atomic_path(out, overwrite=overwrite) as tmp:
        tmp.mkdir()
        (tmp / PLAN_JSON).write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (tmp / PLAN_CSV).write_text(plan_csv(plan.result), encoding="utf-8", newline="")
        (tmp / PLAN_HTML).write_text(page, encoding="utf-8")
    return Path(out)


def plan_csv(result: dict) -> str:
    """The CSV text of a plan: a summary row, then one row per tumour."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerow({"structure": "plan", "volume_ml": result["liver_volume_ml"],
                     **{key: result[key] for key in CSV_COLUMNS[3:11]}})
    for tumour in result["tumours"]:
        x, y, z = tumour["centroid_lps_mm"]
        writer.writerow({
            "structure": "tumour", "id": tumour["id"], "volume_ml": tumour["volume_ml"],
            "resected_volume_ml": tumour["resected_volume_ml"],
            "remnant_volume_ml": tumour["volume_ml"] - tumour["resected_volume_ml"], "resected": tumour["resected"],
            "margin_mm": tumour["margin_mm"], "margin_flag": tumour["margin_flag"] or "",
            "centroid_x_lps_mm": x, "centroid_y_lps_mm": y, "centroid_z_lps_mm": z,
        })
    return buffer.getvalue()


def summary_lines(result: dict) -> list[str]:
    """A short plain-text summary of a plan, for the terminal."""
    lines = [
        f"liver {result['liver_volume_ml']:.1f} mL: resected {result['resected_volume_ml']:.1f} mL, "
        f"remnant {result['remnant_volume_ml']:.1f} mL",
        f"FLR {result['flr_percent']:.1f} % (functional remnant {result['functional_remnant_volume_ml']:.1f} of "
        f"{result['functional_volume_ml']:.1f} mL); {result['liver_state']} liver needs ≥ "
        f"{result['threshold_percent']:.0f} %: {result['verdict'].upper()}",
    ]
    for t in result["tumours"]:
        flag = f" [{t['margin_flag']}]" if t["margin_flag"] else ""
        lines.append(f"tumour {t['id']}: {t['volume_ml']:.2f} mL, resected {t['resected']}, "
                     f"margin {t['margin_mm']:.1f} mm{flag}")
    return lines


# ---------------------------------------------------------------------------------------------- internals


def _figures(labels, resected_liver, geometry) -> list[tuple[bytes, str]]:
    """The axial slice and the frontal projection as (PNG, caption)."""
    axes = canonical_axes(geometry)
    lab, res = canonical_view(labels, axes), canonical_view(resected_liver, axes)
    spacing = canonical_spacing(geometry, axes)  # (z, y, x) of the canonical view
    tumour = lab == TUMOUR
    index, ids = number_tumours(labels)
    focus = [axis[ids == 1] for axis in index] if ids.size else np.nonzero(labels)  # the largest tumour, or the liver
    centre = np.array([axis.mean() for axis in focus])  # input (z, y, x)
    source, flipped = axes[0]  # the input axis shown as canonical z (inferior → superior)
    centre[source] = round(centre[source])
    z = int(labels.shape[source] - 1 - centre[source] if flipped else centre[source])
    colours = {name: np.array(to_rgb(c)) for name, c in
               (("remnant", LIVER_COLOUR), ("resected", RESECTED_COLOUR), ("tumour", TUMOUR_COLOUR))}

    axial = np.zeros((*lab.shape[1:], 3))
    axial[lab[z] > 0] = colours["remnant"]
    axial[res[z]] = colours["resected"]
    axial[tumour[z]] = colours["tumour"]

    # Seen from the front: rays along canonical y (anterior → posterior), superior on top.
    liver = lab[::-1] > 0
    thickness = liver.sum(axis=1)
    resected_fraction = res[::-1].sum(axis=1) / np.maximum(thickness, 1)
    shade = np.where(thickness > 0, 0.35 + 0.65 * np.sqrt(thickness / max(thickness.max(), 1)), 0.0)[..., None]
    mix = resected_fraction[..., None] * colours["resected"] + (1 - resected_fraction[..., None]) * colours["remnant"]
    projection = mix * shade
    in_ray = tumour[::-1].any(axis=1)
    projection[in_ray] = 0.25 * projection[in_ray] + 0.75 * colours["tumour"]

    slice_mm = geometry.index_to_physical(centre)[2]
    return [
        (_png(axial, spacing[1], spacing[2], ("A", "P", "R", "L")), f"Axial slice at S = {slice_mm:.1f} mm."),
        (_png(projection, spacing[0], spacing[2], ("S", "I", "R", "L")),
         "Projection from the front: colour mixes remnant and resected liver along each ray, brightness is the "
         "liver's thickness; tumours in red."),
    ]


def _png(rgb: np.ndarray, row_mm: float, col_mm: float, marks) -> bytes:
    """An RGB image (rows down, columns right as displayed) with orientation letters, as PNG bytes."""
    rows, cols = rgb.shape[:2]
    height_in = float(np.clip(FIGURE_WIDTH_IN * rows * row_mm / (cols * col_mm), 1.5, 9.0))
    figure = Figure(figsize=(FIGURE_WIDTH_IN, height_in), dpi=DPI, facecolor="black")
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.imshow(np.clip(rgb, 0, 1), aspect=row_mm / col_mm, interpolation="nearest")
    return marked_png(figure, ax, marks)


def _html_page(title: str, result: dict, inputs: dict, figures) -> str:
    esc = html.escape
    resection = result["resection"]
    if resection["type"] == "plane":
        x, y, z = resection["point_lps_mm"]
        nx, ny, nz = resection["normal_lps"]
        described = (f"plane through R, A, S = {-x:.1f}, {-y:.1f}, {z:.1f} mm with normal (towards the resected "
                     f"part) R, A, S = {-nx:.3f}, {-ny:.3f}, {nz:.3f}")
    else:
        described = "resected mask (its voxels inside the liver are resected)"
    verdict = result["verdict"]
    rows = [
        ("Resection", described),
        ("Liver volume (including tumour)", f"{result['liver_volume_ml']:.1f} mL"),
        ("Resected liver", f"{result['resected_volume_ml']:.1f} mL"),
        ("Remnant liver", f"{result['remnant_volume_ml']:.1f} mL"),
        ("Functional liver (without tumour)", f"{result['functional_volume_ml']:.1f} mL"),
        ("Functional remnant", f"{result['functional_remnant_volume_ml']:.1f} mL"),
    ]
    parts = [
        *html_head(title, PLAN_CSS),
        f'<p class="meta">Generated {esc(datetime.datetime.now().astimezone().isoformat(timespec="seconds"))} '
        f"by livertumorseg {esc(__version__)} from {esc(', '.join(f'{k}: {v}' for k, v in inputs.items()))}.</p>",
        f'<p class="note"><strong>{esc(RESEARCH_NOTE)}</strong></p>',
        "<h2>Future liver remnant</h2>",
        f'<p>FLR = functional remnant / functional liver = <strong>{result["flr_percent"]:.1f} %</strong>; '
        f"a {esc(result['liver_state'])} liver needs ≥ {result['threshold_percent']:.0f} %: "
        f'<span class="verdict-{verdict}">{"sufficient" if verdict == "pass" else "insufficient"}</span>. '
        f"Thresholds: {esc(', '.join(f'{k} {v:.0f} %' for k, v in result['thresholds_percent'].items()))}.</p>",
        '<table class="summary">',
        *(f'<tr><td>{esc(name)}</td><td class="num">{esc(value)}</td></tr>' for name, value in rows),
        "</table>",
        '<p class="meta">Each voxel is assigned wholly to one side by its centre; volumes are voxel counts '
        "× voxel volume.</p>",
        "<h2>Tumours and margins</h2>",
    ]
    if result["tumours"]:
        header = ["Tumour", "Volume (mL)", "Resected", "Margin (mm)", "Flag", "Centroid R, A, S (mm)"]
        parts += ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
        for t in result["tumours"]:
            x, y, z = t["centroid_lps_mm"]
            cells = [f"{t['id']}", f"{t['volume_ml']:.2f}", t["resected"], f"{t['margin_mm']:.1f}",
                     t["margin_flag"] or "—", f"{-x:.1f}, {-y:.1f}, {z:.1f}"]
            parts.append("<tr>" + "".join(f'<td class="num">{esc(c)}</td>' for c in cells) + "</tr>")
        parts += ["</table>",
                  f'<p class="meta">Margin: smallest distance from a tumour voxel centre to the resection surface '
                  f"({'the plane' if resection['type'] == 'plane' else 'between resected and remnant liver voxels'}"
                  f"; 0 when the tumour crosses it). Flags: R1 risk below {result['r1_margin_mm']:g} mm, close below "
                  f"{result['close_margin_mm']:g} mm.</p>"]
    else:
        parts.append("<p>The label map holds no tumour.</p>")
    legend = "".join(f'<span class="swatch" style="background:{c}"></span>{name}' for name, c in
                     (("remnant liver", LIVER_COLOUR), ("resected liver", RESECTED_COLOUR), ("tumour", TUMOUR_COLOUR)))
    parts += ["<h2>Images</h2>", f'<p class="meta">Patient right on the image\'s left. {legend}</p>',
              '<div class="figures">']
    for png, caption in figures:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{esc(caption)}</figcaption></figure>")
    parts += ["</div>", "</body>", "</html>", ""]
    return "\n".join(parts)

"""Render a 3D Slicer-style picture of a liver/tumour segmentation: an axial slice and a 3D view side by side.

    python scripts/make_slicer_screenshot.py --ct CT.nii.gz --seg segmentation.seg.nrrd --out docs/slicer_view.png
    python scripts/make_slicer_screenshot.py --ct CT.nii.gz --labels segmentation.nii.gz --out view.png

The CT and the segmentation become real MRML nodes, built with the engine's own adapter
(``LiverTumorSegLib.mrml_nodes``: a scalar volume node, a segmentation node with the segments "Liver" and
"Liver tumor" in their standard colours, and their closed-surface representation), and are drawn by Slicer's
own displayable managers in two offscreen views made with trame-slicer (``SlicerApp`` with a
``DirectViewFactory(do_render_offscreen=True)``); no Qt, no window and no GPU are needed (Mesa/EGL suffices).

Left panel ("Axial"): the CT slice in window W400/L50 with the segmentation overlaid (filled, semi-transparent,
with an outline), in radiological convention (patient right on the image's left, anterior at the top), through
the largest cross-section of the largest tumour (26-connected component), or through the largest liver
cross-section when there is no tumour. Right panel ("3D"): the closed surfaces seen from the front (anterior
view, patient right on the image's left), the liver semi-transparent and the tumours opaque. Text labels and
a colour legend are added to the picture. The default size is 1400x700 pixels.

``--seg`` reads a Slicer ``.seg.nrrd`` (e.g. the ``segmentation.seg.nrrd`` that ``livertumorseg demo`` or
``livertumorseg segment`` writes; every tumour segment counts as "Liver tumor") onto the CT's grid; ``--labels``
reads a 0/1/2 label map (0 background, 1 liver, 2 tumour) instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LiverTumorSeg"))

from LiverTumorSegLib import mrml_nodes  # noqa: E402
from LiverTumorSegLib.masks import label_lesions  # noqa: E402
from LiverTumorSegLib.image_io import Image, read_image  # noqa: E402
from LiverTumorSegLib.seg_nrrd import read_segmentation_labels  # noqa: E402

log = logging.getLogger("make_slicer_screenshot")

WINDOW, LEVEL = 400.0, 50.0
LIVER_OPACITY_3D = 0.35
FILL_OPACITY_2D = 0.4
SEPARATOR_PX = 2
#: View label colours of Slicer's layout: the red axial slice view and the blue 3D view.
AXIAL_COLOUR = (243, 74, 51)
THREED_COLOUR = (116, 131, 233)
TEXT_COLOUR = (235, 235, 235)
DIM_TEXT_COLOUR = (190, 190, 190)


# ------------------------------------------------------------------------------------------ inputs


def load_inputs(ct_path: Path, seg_path: Path | None, labels_path: Path | None) -> tuple[Image, Image]:
    """The CT and a 0/1/2 label map (on the CT's grid for --seg, on its own grid for --labels)."""
    ct = read_image(ct_path)
    if seg_path is not None:
        labels = ct.with_array(read_segmentation_labels(seg_path, ct))
    else:
        labels = read_image(labels_path, kind="label map")
        array = np.asarray(labels.array)
        if array.dtype.kind == "f":  # some tools store label maps as floats
            if not np.array_equal(array, np.round(array)):
                raise SystemExit(f"'{labels_path}' holds non-integer values; a 0/1/2 label map is needed.")
            labels = labels.with_array(array.astype(np.int16))
    return ct, labels


def superior_axis(labels: Image) -> int:
    """Array axis (0, 1 or 2 of (z, y, x)) whose voxel direction is closest to the patient's S axis."""
    column = int(np.argmax(np.abs(labels.geometry.direction_matrix[2, :])))  # voxel axes i, j, k = columns
    return 2 - column


def focus_point_ras(labels: Image) -> tuple[np.ndarray, str]:
    """RAS point (mm) the axial slice goes through, and what it is.

    The centre of the largest axial cross-section of the largest tumour; without tumours, of the largest
    liver cross-section; without any segment, the centre of the grid.
    """
    array = np.asarray(labels.array)
    lesions, count = label_lesions(array == 2)
    if count:
        mask, what = lesions == 1, f"largest of {count} tumour{'s' if count > 1 else ''}"
    elif (array == 1).any():
        mask, what = array == 1, "liver (no tumour segmented)"
    else:
        mask, what = None, "centre of the image (empty segmentation)"
    if mask is None:
        index_zyx = (np.asarray(array.shape) - 1) / 2.0
    else:
        axis = superior_axis(labels)
        other = tuple(a for a in range(3) if a != axis)
        best = int(np.argmax(mask.sum(axis=other)))
        section = np.take(mask, best, axis=axis)
        in_plane = np.argwhere(section).mean(axis=0)
        index_zyx = np.insert(in_plane, axis, best)
    ijk = np.append(index_zyx[::-1], 1.0)
    return (mrml_nodes.ijk_to_ras(labels.geometry) @ ijk)[:3], what


# ------------------------------------------------------------------------------------------ scene and views


def build_views(ct: Image, labels: Image, panel_size: tuple[int, int], name: str):
    """A trame-slicer application with the CT and segmentation nodes shown in an axial and a 3D view."""
    from slicer import vtkMRMLAbstractViewNode
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    slice_view = app.view_manager.create_view(ViewLayoutDefinition.axial_view())
    threed_view = app.view_manager.create_view(ViewLayoutDefinition.threed_view())
    views = (slice_view, threed_view)
    # Depth peeling (the translucent liver) draws nothing in a multisampled offscreen window with Mesa.
    threed_view.render_window().SetMultiSamples(0)

    blocked = [view.set_render_blocked(True) for view in views]  # no render on every scene event while building
    volume = mrml_nodes.volume_node_from_image(app.scene, ct, name)
    segmentation = mrml_nodes.segmentation_node_from_labels(app.scene, labels, volume, name=f"{name} segmentation")
    mrml_nodes.add_closed_surfaces(segmentation)

    volume_display = volume.GetDisplayNode()
    volume_display.SetAutoWindowLevel(False)
    volume_display.SetWindowLevel(WINDOW, LEVEL)
    volume_display.SetInterpolate(True)

    display = segmentation.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2DFill(True)
    display.SetVisibility2DOutline(True)
    display.SetOpacity2DFill(FILL_OPACITY_2D)
    display.SetOpacity2DOutline(1.0)
    display.SetSliceIntersectionThickness(2)
    display.SetPreferredDisplayRepresentationName3D("Closed surface")
    # The liver surface also lines the tumours' cavities (the segments are exclusive); without back faces the
    # translucent liver shows only its outer surface and does not flicker on the tumours.
    display.SetBackfaceCulling(True)
    display.SetSpecular(0.25)  # a little gloss: the surfaces read better in 3D
    display.SetPower(20)
    for segment_id in segmentation.GetSegmentation().GetSegmentIDs():
        is_liver = segment_id == mrml_nodes.LIVER_SEGMENT_ID
        display.SetSegmentOpacity3D(segment_id, LIVER_OPACITY_3D if is_liver else 1.0)

    app.display_manager.show_volume_in_slice_background(volume)
    app.display_manager.show_volume_in_slice_foreground(None)

    width, height = panel_size
    for view in views:
        view.render_window().SetSize(width, height)
        view.update_size(width, height)
    slice_view.set_ruler(vtkMRMLAbstractViewNode.RulerTypeThin, vtkMRMLAbstractViewNode.RulerColorWhite)
    view_node = threed_view.get_view_node()
    view_node.SetBoxVisible(False)
    view_node.SetAxisLabelsVisible(False)
    for view, was_blocked in zip(views, blocked):
        view.set_render_blocked(was_blocked)
    app.display_manager.reset_views()  # fits the slice to the volume and turns the 3D camera to the front
    return app, slice_view, threed_view, volume, segmentation


def check_radiological(slice_view) -> None:
    """Refuse to draw if the axial view is not in radiological convention (right on the left, anterior up)."""
    matrix = slice_view.get_view_node().GetSliceToRAS()
    screen_x_ras = [matrix.GetElement(row, 0) for row in range(3)]
    screen_y_ras = [matrix.GetElement(row, 1) for row in range(3)]
    if not (np.allclose(screen_x_ras, (-1, 0, 0)) and np.allclose(screen_y_ras, (0, 1, 0))):
        raise SystemExit(f"The axial view is not in radiological convention (SliceToRAS x {screen_x_ras}, "
                         f"y {screen_y_ras}).")


def put_slice_image_first(slice_view) -> None:
    """Draw the CT slice before the segmentation overlay.

    The offscreen slice view adds its slice image actor to the renderer after the displayable managers'
    actors, and 2D actors are drawn in the renderer's order, so the semi-transparent fill would be blended
    over the black background and then hide the CT. Moving the background-located image actor(s) to the
    front of the renderer's list restores Slicer's look (CT under a see-through fill).
    """
    renderer = slice_view.first_renderer()
    props = renderer.GetViewProps()
    items = [props.GetItemAsObject(index) for index in range(props.GetNumberOfItems())]
    background = [
        prop for prop in items
        if prop.IsA("vtkActor2D") and prop.GetProperty().GetDisplayLocation() == 0  # VTK_BACKGROUND_LOCATION
    ]
    if not background or items[: len(background)] == background:
        return
    for prop in items:
        renderer.RemoveViewProp(prop)
    for prop in background + [prop for prop in items if prop not in background]:
        renderer.AddViewProp(prop)


def zoom_3d(threed_view, factor: float) -> None:
    """Move the 3D camera towards its focal point (factor > 1 enlarges) and re-clip."""
    camera = threed_view.renderer().GetActiveCamera()
    camera.Dolly(factor)
    threed_view.renderer().ResetCameraClippingRange()


def grab(view) -> np.ndarray:
    """The view's pixels as an (height, width, 3) uint8 array, top row first."""
    import vtk
    from vtk.util import numpy_support

    view.render()
    grabber = vtk.vtkWindowToImageFilter()
    grabber.SetInput(view.render_window())
    grabber.SetInputBufferTypeToRGB()
    grabber.ReadFrontBufferOff()
    grabber.Update()
    image = grabber.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return np.ascontiguousarray(pixels[::-1, :, :3])


# ------------------------------------------------------------------------------------------ annotation


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _label(draw, xy, text: str, font, fill, anchor: str = "la") -> None:
    draw.text(xy, text, font=font, fill=fill, anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))


def compose(
    axial: np.ndarray,
    threed: np.ndarray,
    *,
    slice_s_mm: float,
    focus: str,
    colours: dict[str, tuple[float, float, float]],
    tumour_count: int,
):
    """Both panels side by side with their labels, orientation letters and the legend (a PIL image)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    height, width = axial.shape[:2]
    canvas = np.full((height, 2 * width + SEPARATOR_PX, 3), 60, dtype=np.uint8)
    canvas[:, :width] = axial
    canvas[:, width + SEPARATOR_PX:] = threed
    picture = PILImage.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    big, medium, small = _font(24), _font(18), _font(15)
    right = width + SEPARATOR_PX

    # Slicer's view labels: a coloured tag in the top-left corner of each view.
    for x0, text, colour in ((0, "Axial", AXIAL_COLOUR), (right, "3D", THREED_COLOUR)):
        box = draw.textbbox((0, 0), text, font=big)
        draw.rectangle((x0, 0, x0 + box[2] + 20, box[3] + 14), fill=colour)
        draw.text((x0 + 10, 6), text, font=big, fill=(255, 255, 255))

    # Axial panel: orientation letters (radiological convention) and the slice position.
    _label(draw, (10, height // 2), "R", medium, TEXT_COLOUR, anchor="lm")
    _label(draw, (width - 10, height // 2), "L", medium, TEXT_COLOUR, anchor="rm")
    _label(draw, (width // 2, 10), "A", medium, TEXT_COLOUR, anchor="ma")
    _label(draw, (width // 2, height - 40), "P", medium, TEXT_COLOUR, anchor="md")  # above Slicer's ruler
    _label(draw, (width - 10, 10), f"S {slice_s_mm:.1f} mm", small, DIM_TEXT_COLOUR, anchor="ra")
    _label(draw, (width - 10, 30), f"W {WINDOW:.0f} / L {LEVEL:.0f}", small, DIM_TEXT_COLOUR, anchor="ra")
    _label(draw, (10, 44), f"slice through the {focus}", small, DIM_TEXT_COLOUR)

    # 3D panel: view direction and the legend.
    _label(draw, (right + width - 10, 10), "anterior view", small, DIM_TEXT_COLOUR, anchor="ra")
    tumour_text = (
        "Liver tumor (none)" if tumour_count == 0
        else f"Liver tumor ({tumour_count} lesion{'s' if tumour_count > 1 else ''})"
    )
    entries = [
        (colours[mrml_nodes.LIVER_SEGMENT_ID], "Liver"),
        (colours[mrml_nodes.TUMOUR_SEGMENT_ID], tumour_text),
    ]
    line = 28
    x, y = right + 16, height - 16 - line * len(entries)
    text_width = max(draw.textlength(text, font=medium) for _, text in entries)
    shade = PILImage.new("RGBA", picture.size, (0, 0, 0, 0))
    ImageDraw.Draw(shade).rounded_rectangle(
        (x - 8, y - 6, x + 36 + text_width, y + line * len(entries) + 4), radius=6, fill=(0, 0, 0, 140)
    )
    picture.paste(PILImage.alpha_composite(picture.convert("RGBA"), shade).convert("RGB"))
    draw = ImageDraw.Draw(picture)
    for colour, text in entries:
        rgb = tuple(int(round(255 * c)) for c in colour)
        draw.rectangle((x, y + 4, x + 18, y + 22), fill=rgb, outline=(0, 0, 0))
        _label(draw, (x + 28, y + 13), text, medium, TEXT_COLOUR, anchor="lm")
        y += line
    return picture


# ------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=Path, required=True, help="CT image (NIfTI, NRRD, MHA or a DICOM folder)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--seg", type=Path, help="segmentation as a Slicer .seg.nrrd")
    source.add_argument("--labels", type=Path, help="segmentation as a 0/1/2 label map (1 liver, 2 tumour)")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--width", type=int, default=1400, help="picture width in pixels (default 1400)")
    parser.add_argument("--height", type=int, default=700, help="picture height in pixels (default 700)")
    parser.add_argument("--zoom-3d", type=float, default=1.05, help="3D camera zoom after fitting (default 1.05)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.width < 200 or args.height < 200:
        parser.error("the picture must be at least 200x200 pixels")

    start = time.perf_counter()
    ct, labels = load_inputs(args.ct, args.seg, args.labels)
    focus_ras, focus = focus_point_ras(labels)
    _, tumour_count = label_lesions(np.asarray(labels.array) == 2)
    loaded = time.perf_counter()

    panel = ((args.width - SEPARATOR_PX) // 2, args.height)
    name = args.ct.name.split(".")[0] or "CT"
    app, slice_view, threed_view, _volume, segmentation = build_views(ct, labels, panel, name)
    check_radiological(slice_view)
    slice_view.set_slice_value(float(focus_ras[2]))
    zoom_3d(threed_view, args.zoom_3d)
    slice_view.render()  # the slice image actor joins the renderer on the first render
    put_slice_image_first(slice_view)
    built = time.perf_counter()

    axial_pixels = grab(slice_view)
    threed_pixels = grab(threed_view)
    colours = {
        segment_id: tuple(segmentation.GetSegmentation().GetSegment(segment_id).GetColor())
        for segment_id in (mrml_nodes.LIVER_SEGMENT_ID, mrml_nodes.TUMOUR_SEGMENT_ID)
    }
    picture = compose(
        axial_pixels, threed_pixels, slice_s_mm=slice_view.get_slice_value(), focus=focus,
        colours=colours, tumour_count=tumour_count,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.out, optimize=True)
    done = time.perf_counter()
    log.info(
        "Wrote %s (%dx%d): axial slice S = %.1f mm through the %s. Time %.1f s (read %.1f, nodes and views %.1f, "
        "render and save %.1f).",
        args.out, picture.width, picture.height, slice_view.get_slice_value(), focus,
        done - start, loaded - start, built - loaded, done - built,
    )
    for view in (slice_view, threed_view):  # stop the views before the scene goes, or its teardown re-renders
        view.set_render_blocked(True)
        view.finalize()
    del app
    return 0


if __name__ == "__main__":
    sys.exit(main())

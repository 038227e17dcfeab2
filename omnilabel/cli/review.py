"""Review commands: ``evaluate`` and ``visualize``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from omnilabel.cli.app import app
from omnilabel.cli.display import evaluate_tables, events, out, table


@app.command()
def evaluate(
    predictions: Annotated[Path, typer.Argument(
        help="COCO results list, or a complete COCO file such as a pseudomask output.")],
    gt: Annotated[Path, typer.Option(help="Ground-truth COCO JSON with instance masks.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the numbers as JSON here.")] = None,
) -> None:
    """COCO mask AP of predictions; for pseudomasks, also teacher mIoU per weak type.

    Prints segm AP, AP50, AP75, APs/m/l (pycocotools), over the images a complete COCO file lists (every GT
    image for a results list). When the predictions are an omnilabel pseudomask
    file whose annotations carry `omnilabel.weak_id`, it also prints the mean mask IoU and mean boundary
    IoU of the pseudomasks against the GT masks of those ids, per weak type.
    """
    from omnilabel.eval.report import evaluate_files

    result = evaluate_files(predictions, gt, json_out=json_out)
    for t in evaluate_tables(result, predictions.name):
        out.print(t)


@app.command()
def visualize(
    coco: Annotated[Path, typer.Argument(
        help="COCO JSON to draw: a pseudomask output, a GT or weak file, or a results list (needs --gt).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write the pictures into.")],
    images: Annotated[Path | None, typer.Option(
        help="Image folder [default: the folder of the JSON that lists the images; --gt's for a results "
             "list].")] = None,
    gt: Annotated[Path | None, typer.Option(
        help="Ground-truth COCO JSON: also write GT | prediction pictures with each image's mIoU.")] = None,
    uncertainty: Annotated[bool, typer.Option(
        "--uncertainty", help="Also write heat maps of the annotations' uncertainty maps "
                              "(`omnilabel.uncertainty`).")] = False,
    html: Annotated[bool, typer.Option(
        "--html", help="Also write index.html, a static page of every image (worst mIoU first with --gt).")]
    = False,
    min_score: Annotated[float, typer.Option(help="Do not draw annotations scoring lower.")] = 0.0,
    max_images: Annotated[int | None, typer.Option(help="Draw only the first N images (by id).")] = None,
    alpha: Annotated[float, typer.Option(help="Opacity of the mask colour, 0..1.")] = 0.45,
    thumb_size: Annotated[int, typer.Option(help="Side of the contact sheet's thumbnails in pixels.")] = 256,
) -> None:
    """Draw masks, prompts and labels on the images, for a person to review.

    Writes `images/<id>_<name>.png` (each image at its size, every instance in its own colour, with the
    point or box that prompted it and a `class score` label), `contact_sheet.png` (the first 100 images);
    with --gt, `compare/` (GT left, prediction right, with the image's mIoU); with --uncertainty,
    `uncertainty/`; with --html, `index.html`.
    """
    from omnilabel.viz import VizConfig
    from omnilabel.viz import visualize as run_visualize

    config = VizConfig(min_score=min_score, max_images=max_images, alpha=alpha, thumb_size_px=thumb_size,
                       uncertainty=uncertainty, html=html)
    with events("visualize") as on_event:
        summary = run_visualize(coco, output_dir=output, images_dir=images, gt_path=gt, config=config,
                                on_event=on_event)
    rows = [("overlays", f"{summary['output_dir']}/images/")]
    if summary["compare"]:
        rows.append(("GT | prediction", f"{summary['output_dir']}/compare/ ({summary['compare']} images)"))
    if uncertainty:
        rows.append(("uncertainty", f"{summary['output_dir']}/uncertainty/ ({summary['uncertainty']} images)"))
    capped = f", first {summary['contact_sheet_images']} of {summary['images']} images" \
        if summary["contact_sheet_capped"] else ""
    rows.append(("contact sheet", f"{summary['contact_sheet']}{capped}"))
    if summary["html"]:
        rows.append(("html", summary["html"]))
    if gt is not None:
        mean = "n/a" if summary["mean_miou"] is None else f"{summary['mean_miou']:.3f}"
        rows.append(("mean mIoU", f"{mean} over {summary['scored_images']} images with GT masks"))
    out.print(table(f"wrote {summary['images']} images to {summary['output_dir']}", rows, columns=("what", "where")))

"""Review commands: ``evaluate``, ``visualize`` and ``rank``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from omnilabel.cli.app import app
from omnilabel.cli.display import evaluate_tables, events, out, rank_table, table
from omnilabel.eval.rank import RankBy


@app.command()
def evaluate(
    predictions: Annotated[Path, typer.Argument(
        help="COCO results list, or a complete COCO file such as a pseudomask output.")],
    gt: Annotated[Path, typer.Option(help="Ground-truth COCO JSON with instance masks.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the numbers as JSON here.")] = None,
    uois: Annotated[bool, typer.Option(
        "--uois", help="Also compute the class-agnostic UOIS metrics: Overlap and Boundary P/R/F and %75, "
                       "per image then averaged.")] = False,
) -> None:
    """COCO mask AP of predictions; for pseudomasks, also teacher mIoU per weak type; UOIS metrics on request.

    Prints segm AP, AP50, AP75, APs/m/l (pycocotools), over the images a complete COCO file lists (every GT
    image for a results list). When the predictions are an omnilabel pseudomask
    file whose annotations carry `omnilabel.weak_id`, it also prints the mean mask IoU and mean boundary
    IoU of the pseudomasks against the GT masks of those ids, per weak type.

    With --uois, also the unseen-object instance segmentation metrics of UOIS-Net / UOIS-SAM, class-agnostic
    (categories ignored), over the same images: each image's predictions are painted into one label map by
    ascending score (the higher score wins an overlap), matched one-to-one to the GT objects by the Hungarian
    algorithm on the F-measure, and scored as Overlap P/R/F, Boundary P/R/F (1-px boundaries, tolerance
    ceil(0.003 x image diagonal) px) and %75 (GT objects matched with F > 0.75); crowd GT regions are
    don't-care. Printed in percent; --json holds them in [0, 1] under `uois`.
    """
    from omnilabel.eval.report import evaluate_files

    result = evaluate_files(predictions, gt, json_out=json_out, uois=uois)
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


#: Rows of the ``rank`` table when --top is not given.
RANK_TABLE_ROWS = 20


@app.command()
def rank(
    coco: Annotated[Path, typer.Argument(
        help="Pseudomask COCO file scored with uncertainty (annotations carry `omnilabel.uncertainty_mean`).")],
    by: Annotated[RankBy, typer.Option(
        help="Image score: `mean` = mean of its pseudomasks' `uncertainty_mean` (the image as a whole is "
             "doubtful); `max` = the highest one (one bad mask is enough).")] = RankBy.MEAN,
    top: Annotated[int | None, typer.Option(
        show_default=False, help=f"The N most uncertain images: rows of the table, and what -o writes "
                                 f"[default: {RANK_TABLE_ROWS} rows].")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Write the --top images, with all their annotations (GT and pseudo), as a COCO "
                               "file here, to relabel.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the whole ranking as JSON here.")]
    = None,
) -> None:
    """Rank images by how uncertain their pseudomasks are, worst first, to pick what a person relabels.

    Each pseudomask's score is its `omnilabel.uncertainty_mean`: the mean of its per-pixel uncertainty map, in
    [0, 1], higher = less certain (written by `omnilabel uncertainty` or `pseudomask --refiner`). An image's
    score is the mean (`--by mean`) or the max (`--by max`) over its pseudomasks; GT annotations never count.
    Ties go to the lower image id; images without a scored pseudomask are not ranked, only counted. Prints
    the top rows with each image's worst annotation; `--top N -o relabel.json` writes those N images as a
    COCO file, with `omnilabel.uncertainty` paths rewritten to stay valid from its folder.
    """
    from omnilabel.eval.rank import rank_file

    summary = rank_file(coco, by=by, top=top, output=output, json_out=json_out)
    ranking = summary["ranking"]
    rows = ranking.to_dict()["ranking"][:top or RANK_TABLE_ROWS]
    out.print(rank_table(rows, title=f"most uncertain images of {coco.name} (score: {ranking.by.value} "
                                     "pseudomask uncertainty)"))
    totals = (f"{len(ranking.images)} of {summary['images']} images ranked, {ranking.unranked_images} without a "
              f"scored pseudomask; showing the top {len(rows)}")
    if ranking.unscored_pseudo:
        totals += f"; {ranking.unscored_pseudo} pseudomasks without uncertainty_mean left out"
    out.print(totals, soft_wrap=True)
    if summary["output"] is not None:
        out.print(f"wrote {summary['output']}: {summary['output_images']} images, "
                  f"{summary['output_annotations']} annotations", soft_wrap=True)
    if summary["json"] is not None:
        out.print(f"wrote the ranking to {summary['json']}", soft_wrap=True)

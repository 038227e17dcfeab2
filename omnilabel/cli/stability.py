"""``stability``: Stable-SAM's mIoU / mBIoU / mSF of plain SAM and each teacher under random prompts (a job)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from omnilabel.cli.app import app
from omnilabel.cli.display import events, job_rows, out, table
from omnilabel.cli.options import (
    Address,
    AllowOutsideImages,
    BatchSize,
    Device,
    Images,
    JobDir,
    NumWorkers,
    Overwrite,
    default_output,
    job_options,
)


def results_table(summary: dict[str, Any]) -> Table:
    """Rows: prompt types; columns: models, each cell ``mIoU / mBIoU / mSF`` (x 100; ``-`` where undefined)."""
    t = Table(title="mIoU / mBIoU / mSF (x 100)")
    t.add_column("prompt")
    for m in summary["models"]:
        t.add_column("SAM " + m["id"] if m["kind"] == "sam" else m["name"], justify="right")
    for ptype in summary["settings"]["prompts"]:
        cells = []
        for m in summary["models"]:
            r = summary["results"][m["name"]][ptype]
            cells.append(" / ".join("-" if r[key] is None else f"{r[key]:.1f}" for key in ("miou", "mbiou", "msf")))
        t.add_row(ptype, *cells)
    return t


@app.command()
def stability(
    coco: Annotated[Path, typer.Argument(
        help="COCO JSON with full masks: every instance with a `segmentation` is evaluated (crowd regions are not).")],
    images: Images = None,
    json_out: Annotated[Path | None, typer.Option(
        "--json", "-o", show_default=False,
        help="The results as JSON (per model and prompt type: miou, mbiou, msf in percent, counts; the settings) "
             "[default: COCO.stability.json beside the input].")] = None,
    sam: Annotated[str | None, typer.Option(
        help="Plain SAM, and the base the teachers decode on: vit_b, vit_l, vit_h or a path [default: the "
             "teachers' base, else vit_h].")] = None,
    plain_sam: Annotated[bool, typer.Option(
        "--plain-sam/--no-plain-sam", help="Evaluate plain SAM beside the teachers; --no-plain-sam compares the "
                                           "teachers alone.")] = True,
    teacher: Annotated[list[Path] | None, typer.Option(
        metavar="PATH", help="A fine-tuned teacher file to compare with plain SAM; repeat for several. All "
                             "decode from one encoding of each image (a teacher holding its own encoder is encoded "
                             "with it).")] = None,
    prompts: Annotated[str, typer.Option(
        help="Prompt types, comma-separated: box (the GT box), noisy-box, 1-point, 3-points, 5-points, "
             "10-points.")] = "box,noisy-box,1-point,3-points,5-points",
    k: Annotated[int, typer.Option("--k", help="Random prompts per instance and prompt type (paper: 20).")] = 20,
    noise: Annotated[float, typer.Option(help="Noisy-box noise scale (paper: 0.4).")] = 0.4,
    min_box_iou: Annotated[float, typer.Option(
        help="Redraw a noisy box until its IoU with the GT box reaches this (the paper's training filter; it does "
             "not say whether it applies at test); 0 turns it off.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the prompts (with the image and annotation ids).")] = 0,
    num_workers: NumWorkers = None,
    address: Address = None,
    device: Device = "cpu",
    batch_size: BatchSize = None,
    job_dir: JobDir = None,
    overwrite: Overwrite = False,
    allow_outside_images: AllowOutsideImages = False,
) -> None:
    """How stable the masks are under loose prompts (Stable-SAM's protocol), for plain SAM and each teacher.

    For every GT instance, k random prompts per prompt type: noisy GT boxes (DN-DETR noise, scale 0.4), 1, 3
    or 5 random clicks inside the mask, and the GT box itself as the reference. Reported per model and type:
    mIoU, mBIoU (boundary IoU, band 2% of the image diagonal) and mSF, the stability score: the mean IoU of
    each of an instance's k masks with their union (100 = every prompt gave the same mask; "-" for the GT
    box, which is one prompt). Every model sees the same prompts. Resumable; `--num-workers N` runs on Ray.
    Default `--batch-size`: 8 images per shard.
    """
    from omnilabel.jobs.options import Dataset
    from omnilabel.jobs.stability import StabilityConfig, StabilityModels, parse_prompt_types, run_stability

    job = job_options(num_workers, address, device, batch_size, job_dir=job_dir, overwrite=overwrite)
    config = StabilityConfig(prompts=parse_prompt_types(prompts), k=k, noise=noise, min_box_iou=min_box_iou,
                             seed=seed)
    models = StabilityModels(sam=sam, teachers=tuple(str(t) for t in teacher or ()), plain=plain_sam)
    target = json_out or default_output(coco, ".stability.json")
    with events("stability") as on_event:
        summary = run_stability(Dataset(coco, images, allow_outside_images), target, models, config, job,
                                on_event=on_event)
    out.print(results_table(summary))
    rows = [("images (instances)", f"{summary['images']} ({summary['instances']})"),
            ("random prompts per instance and type", str(summary["settings"]["k"])),
            ("encoder calls per image", f"{summary['encoder_calls']:.0f}"),
            ("seconds per image", "  ".join(f"{stage} {s:.2f}" for stage, s in summary["seconds"].items())),
            ("images that failed", str(summary["errors"]))]
    if summary["empty_masks"]:
        rows.append(("empty GT masks skipped", str(summary["empty_masks"])))
    rows += job_rows(summary)
    rows.append(("wall time", f"{summary['wall_s']:.1f} s"))
    out.print(table(f"wrote {summary['output']}", rows))

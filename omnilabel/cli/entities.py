"""``entities``: E-SAM's class-agnostic entity masks for every image (a job like ``pseudomask``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from omnilabel.cli.app import app
from omnilabel.cli.display import events, job_rows, out, table
from omnilabel.cli.options import (
    Address,
    AllowOutsideImages,
    BatchSize,
    Device,
    JobDir,
    NumWorkers,
    Overwrite,
    job_options,
)
from omnilabel.errors import InputError


@app.command()
def entities(
    coco: Annotated[Path | None, typer.Argument(
        show_default=False, help="A COCO file naming the images (its image ids are kept); or give --images alone.")
    ] = None,
    images: Annotated[Path | None, typer.Option(
        "--images", show_default=False,
        help="Image folder: every image in it (ids 1..N by file name, as `predict` assigns them) or, with COCO, "
             "the folder its `file_name`s are relative to [default: the JSON's folder].")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", show_default=False,
        help="Entities COCO JSON [default: COCO.entities.json beside the input, or entities.json in --images' "
             "parent folder].")] = None,
    maps: Annotated[Path | None, typer.Option(
        "--maps", show_default=False,
        help="Also write one 16-bit PNG per image, MAPS/IMAGE_ID.png, whose pixels hold the `entity_id` of "
             "the entity covering them (0: none).")] = None,
    sam: Annotated[str | None, typer.Option(
        help="SAM checkpoint: vit_b, vit_l, vit_h or a path [default: the teacher's base, else vit_h].")] = None,
    teacher: Annotated[Path | None, typer.Option(
        help="A fine-tuned teacher file (`omnilabel finetune-teacher`) to segment with instead of plain SAM.")
    ] = None,
    points_per_side: Annotated[int, typer.Option(
        help="MMG point grid, N x N points (paper: 32).")] = 32,
    gallery_points_per_side: Annotated[int, typer.Option(
        help="Mask gallery grid for overlap separation and merging (paper: 64).")] = 64,
    num_workers: NumWorkers = None,
    address: Address = None,
    device: Device = "cpu",
    batch_size: BatchSize = None,
    job_dir: JobDir = None,
    overwrite: Overwrite = False,
    allow_outside_images: AllowOutsideImages = False,
) -> None:
    """Segment every entity of every image, training-free (E-SAM): class-agnostic, non-overlapping masks.

    Each image is encoded by SAM once; a 32 x 32 point grid gives three masks per point (object, part,
    subpart by area), filtered by NMS and a consistency check (MMG); overlaps are split and fragments of one
    entity merged with a 64 x 64 mask gallery (EMR); superpixels no entity covers are prompted again (USR).
    The output is COCO with one category `entity`, an RLE mask, a score and `omnilabel.entity_id` per entity;
    `pseudomask --proposals OUTPUT` labels them with classes. Resumable; `--num-workers N` runs on Ray.
    Default `--batch-size`: 8 images per shard.
    """
    from omnilabel.jobs.entities import EntitiesInputs, run_entities
    from omnilabel.teachers.entity import EntityConfig
    from omnilabel.teachers.loading import TeacherSpec

    job = job_options(num_workers, address, device, batch_size, job_dir=job_dir, overwrite=overwrite)
    if coco is None and images is None:
        raise InputError("entities: give a COCO file naming the images, or --images DIR (a folder of images)")
    config = EntityConfig(grid_points_per_side=points_per_side, gallery_points_per_side=gallery_points_per_side)
    spec = TeacherSpec(sam=sam, teacher=None if teacher is None else str(teacher), detector="none", device=device)
    if output is None:
        output = (coco.with_name(coco.name.removesuffix(".json") + ".entities.json") if coco is not None
                  else Path(images).absolute().parent / "entities.json")  # type: ignore[arg-type]
    with events("entities") as on_event:
        summary = run_entities(EntitiesInputs(coco, images, allow_outside_images), output, spec, config, job,
                               maps=maps, on_event=on_event)
    n = max(summary["images"] - summary["errors"], 1)
    rows = [("images", str(summary["images"])), ("entities", str(summary["entities"])),
            ("entities per image", f"{summary['entities'] / n:.1f}"),
            ("pixels covered (before USR)", f"{summary['covered']:.1%} ({summary['covered_before_usr']:.1%})"),
            ("encoder / decoder calls per image",
             f"{summary['encoder_calls']:.0f} / {summary['decoder_calls']:.0f}"),
            ("seconds per image", "  ".join(f"{k} {v:.2f}" for k, v in summary["seconds"].items())),
            ("images that failed", str(summary["errors"]))]
    rows += job_rows(summary)
    if summary["maps"]:
        rows.append(("entity maps", summary["maps"]))
    rows.append(("wall time", f"{summary['wall_s']:.1f} s"))
    out.print(table(f"wrote {summary['output']}", rows))

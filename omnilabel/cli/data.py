"""Data commands: ``split``, ``validate``, ``synth``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from omnilabel.cli.app import app
from omnilabel.cli.display import out, table
from omnilabel.cli.options import AllowOutsideImages, Images, default_output
from omnilabel.data.weak import SplitWeak


@app.command()
def split(
    coco: Annotated[Path, typer.Argument(help="A fully annotated COCO JSON (instance masks).")],
    fully: Annotated[float, typer.Option(help="Fraction of images that keep their full masks (0..1).")] = 0.1,
    weak: Annotated[SplitWeak, typer.Option(
        help="Weak type for every other annotation: `tags` (class only), `points` (one click inside the "
             "mask), `boxes` (the mask's box), `mixed` (a random type per annotation), `mixed-images` (a random "
             "type per image).")] = SplitWeak.POINTS,
    seed: Annotated[int, typer.Option(help="Random seed: same input and seed give the same bytes.")] = 0,
    output: Annotated[Path | None, typer.Option("-o", "--output",
                                                help="Output COCO JSON [default: COCO.weak.json beside it].")]
    = None,
) -> None:
    """Simulate a weakly annotated dataset from a fully annotated one.

    Keeps masks on a seeded fraction of the images and turns every other annotation into the weak type.
    Image and annotation ids are kept, so pseudomasks made later can be scored against the masks they
    came from (`omnilabel evaluate`).
    """
    from omnilabel.data.weak import split_file

    target = output or default_output(coco, ".weak.json")
    counts = split_file(coco, output=target, fully=fully, weak=weak, seed=seed)
    out.print(f"wrote {target}")
    out.print(table("annotations by weak type", [(k, str(v)) for k, v in counts.items()],
                    columns=("weak type", "count")))


@app.command()
def validate(
    coco: Annotated[Path, typer.Argument(help="A COCO JSON (full or weak annotations).")],
    images: Images = None,
    allow_outside_images: AllowOutsideImages = False,
) -> None:
    """Check a COCO file and open every image it names.

    Reports every problem at once, each naming the file, the record and the field. Jobs do not open
    images up front (a missing image is recorded and the job goes on); run this to check them first.
    """
    from omnilabel.data.weak import validate_file

    summary = validate_file(coco, images_dir=images, allow_outside_images=allow_outside_images)
    counts = ", ".join(f"{k} {v}" for k, v in summary["weak"].items())
    out.print(f"{coco}: OK — {summary['images']} images, {summary['annotations']} annotations ({counts})")


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write `images/` and `coco.json` into.")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 40,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    max_objects: Annotated[int, typer.Option(help="Most shapes per image.")] = 5,
) -> None:
    """Write a synthetic, fully annotated dataset of textured shapes (for trying omnilabel out).

    `coco.json`'s `file_name`s are relative to `OUT_DIR/images`: pass `--images OUT_DIR/images` to the
    other commands.
    """
    from omnilabel.data.synthetic import make_dataset

    path = make_dataset(out_dir, n_images=n, seed=seed, size_hw=(size, size), max_objects=max_objects)
    out.print(f"wrote {n} images and {path}")

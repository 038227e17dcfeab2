"""The ``omnilabel`` command line: parses, validates flags, calls one library function per command.

No logic lives here. Library errors (``OmnilabelError``) become one readable line on stderr and a
non-zero exit code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from omnilabel import __version__
from omnilabel.errors import InputError, OmnilabelError

app = typer.Typer(
    name="omnilabel",
    help=(
        "Turn weak annotations (image-level tags, one point per object, boxes) into COCO instance "
        "pseudomasks, and train and evaluate the model that learns from them.\n\n"
        "Input and output are COCO JSON. Run `omnilabel COMMAND --help` for each command."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
console = Console(stderr=True)
out = Console()

_state: dict[str, Any] = {"debug": False}


class SplitWeakOpt(str, Enum):
    tags = "tags"
    points = "points"
    boxes = "boxes"
    mixed = "mixed"


def _version(value: bool) -> None:
    if value:
        out.print(f"omnilabel {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug


def _default_output(path: Path, suffix: str) -> Path:
    return path.with_name(path.name.removesuffix(".json") + suffix)


# -- data ------------------------------------------------------------------------------------------


@app.command()
def split(
    coco: Annotated[Path, typer.Argument(help="A fully annotated COCO JSON (instance masks).")],
    fully: Annotated[float, typer.Option(help="Fraction of images that keep their full masks (0..1).")] = 0.1,
    weak: Annotated[SplitWeakOpt, typer.Option(
        help="Weak type for every other annotation: `tags` (class only), `points` (one click inside the "
             "mask), `boxes` (the mask's box), `mixed` (a random type per annotation).")] = SplitWeakOpt.points,
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
    from omnilabel.data.coco import load_coco, write_coco
    from omnilabel.data.weak import split_coco, summarize_weak

    data = load_coco(coco, allow_outside_images=True)
    result = split_coco(data, fully=fully, weak=weak.value, seed=seed)
    target = output or _default_output(coco, ".weak.json")
    write_coco(result, target)
    counts = summarize_weak(result)
    out.print(f"wrote {target}")
    table = Table(title="annotations by weak type")
    table.add_column("weak type")
    table.add_column("count", justify="right")
    for key, value in counts.items():
        table.add_row(key, str(value))
    out.print(table)


@app.command()
def validate(
    coco: Annotated[Path, typer.Argument(help="A COCO JSON (full or weak annotations).")],
    images: Annotated[Path | None, typer.Option(
        help="Folder the images' `file_name`s are relative to [default: the JSON's folder].")] = None,
    allow_outside_images: Annotated[bool, typer.Option(
        help="Accept absolute `file_name`s and ones that climb out of --images.")] = False,
) -> None:
    """Check a COCO file and open every image it names.

    Reports every problem at once, each naming the file, the record and the field. Jobs do not open
    images up front (a missing image is recorded and the job goes on); run this to check them first.
    """
    from omnilabel.data.coco import check_image_files, load_coco
    from omnilabel.data.weak import summarize_weak

    images_dir = images or coco.parent
    data = load_coco(coco, images_dir=images_dir, allow_outside_images=allow_outside_images)
    problems = check_image_files(data, images_dir, allow_outside_images=allow_outside_images)
    if problems:
        raise InputError(f"{coco}: {len(problems)} image problem(s)", problems)
    counts = ", ".join(f"{k} {v}" for k, v in summarize_weak(data).items())
    out.print(f"{coco}: OK — {len(data['images'])} images, {len(data['annotations'])} annotations ({counts})")


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write `images/` and `coco.json` into.")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 40,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    max_objects: Annotated[int, typer.Option(help="Most shapes per image.")] = 5,
) -> None:
    """Write a synthetic, fully annotated dataset of textured shapes (for trying omnilabel out)."""
    from omnilabel.data.synthetic import make_dataset

    if n < 1 or size < 16:
        raise InputError(f"synth: --n must be ≥ 1 and --size ≥ 16 (got {n}, {size})")
    path = make_dataset(out_dir, n_images=n, seed=seed, size_hw=(size, size), max_objects=max_objects)
    out.print(f"wrote {n} images and {path}")


# -- evaluation ------------------------------------------------------------------------------------


@app.command()
def evaluate(
    predictions: Annotated[Path, typer.Argument(
        help="COCO results list, or a complete COCO file such as a pseudomask output.")],
    gt: Annotated[Path, typer.Option(help="Ground-truth COCO JSON with instance masks.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the numbers as JSON here.")] = None,
) -> None:
    """COCO mask AP of predictions; for pseudomasks, also teacher mIoU per weak type.

    Prints segm AP, AP50, AP75, APs/m/l (pycocotools). When the predictions are an omnilabel pseudomask
    file whose annotations carry `omnilabel.weak_id`, it also prints the mean mask IoU and mean boundary
    IoU of the pseudomasks against the GT masks of those ids, per weak type.
    """
    from omnilabel.data.coco import load_coco, read_json, write_json_atomic
    from omnilabel.eval.coco_eval import evaluate_segm
    from omnilabel.eval.miou import has_weak_ids, teacher_miou

    gt_data = load_coco(gt, allow_outside_images=True)
    pred = read_json(predictions)
    if isinstance(pred, dict):
        pred = load_coco(predictions, allow_outside_images=True)
    elif not isinstance(pred, list):
        raise InputError(f"{predictions}: expected a COCO results list or a COCO file, got {type(pred).__name__}")
    metrics = evaluate_segm(pred, gt_data)
    table = Table(title=f"COCO segm AP — {predictions.name}")
    for key in metrics:
        table.add_column(key, justify="right")
    table.add_row(*(f"{v:.3f}" for v in metrics.values()))
    out.print(table)
    result: dict[str, Any] = {"segm": metrics}
    if isinstance(pred, dict) and has_weak_ids(pred):
        per_weak = teacher_miou(pred, gt_data)
        t = Table(title="pseudomask quality against GT (by weak type)")
        for col in ("weak", "count", "mIoU", "boundary IoU"):
            t.add_column(col, justify="right" if col != "weak" else "left")
        for weak, row in per_weak.items():
            t.add_row(weak, str(row["count"]), f"{row['miou']:.3f}", f"{row['boundary_iou']:.3f}")
        out.print(t)
        result["teacher"] = per_weak
    if json_out is not None:
        write_json_atomic(result, json_out)


# -- entry point -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turn library errors into one line and exit code 1."""
    try:
        app(args=argv, standalone_mode=False)
    except OmnilabelError as exc:
        if _state["debug"]:
            raise
        console.print(Text("error: ", style="bold red") + Text(str(exc)), soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:
        # Usage errors (typer's bundled click): show the usage line and the problem, exit 2.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
